"""The registered model's code, as MLflow's models-from-code wants it: MLflow runs this file
to load a model, then `DicomClassifier.load_context` fills it from the model's artifacts
(weights and model.json). No object is unpickled: loading does not depend on cloudpickle's
version or on how our classes were laid out when the model was logged."""

from mlflow.models import set_model

from covid_xray.model.pyfunc import DicomClassifier

set_model(DicomClassifier())
