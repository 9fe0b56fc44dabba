"""Training: one run, or a study of them.

Owns the PyTorch loop (`fit`), one training run end to end (data, fit, calibration, test,
logging, registration), the Optuna study and its worker processes. It imports every layer
below it.
"""
