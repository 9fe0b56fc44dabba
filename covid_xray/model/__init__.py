"""Model: what gets logged and served.

Owns the network families and the classifier, the MLflow pyfunc that answers DICOMs with
calibrated probabilities and a label at the stored threshold, those answers as DICOM objects
(Structured Report, Grad-CAM Secondary Capture), and the served-model file MLflow loads. It
imports imaging, evaluation (calibration, Grad-CAM) and the top-level modules, never data,
training or tracking: a deployment loads it without them (tests/test_layers.py).
"""
