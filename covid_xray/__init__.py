"""covid-xray: chest X-ray COVID-19 classifiers, trained and tracked with MLflow."""

import os

# Both libraries phone home on import unless told not to; these machines (and many hospitals)
# have no internet, so we switch it off before anything imports them.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

__version__ = "0.1.0"
