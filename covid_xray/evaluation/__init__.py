"""Evaluation: labels and probabilities in, numbers and pictures out; pure functions, no
MLflow.

Owns the metrics (vectorised over bootstrap resamples), the report with its 95% intervals,
calibration and operating points, subgroup tables and Grad-CAM. It imports imaging (Grad-CAM
draws on the film) and the top-level modules.
"""
