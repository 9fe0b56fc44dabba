"""The registered model's code, as MLflow's models-from-code wants it: MLflow runs this file
to load a model, then `DicomClassifier.load_context` fills it from the model's artifacts
(weights and model.json). Nothing is unpickled, so a new Python or library version loads it."""

from mlflow.models import set_model

from covid_xray.pyfunc import DicomClassifier

set_model(DicomClassifier())
