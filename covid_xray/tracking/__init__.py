"""Tracking: everything said to MLflow.

Owns the MLflow run (server check, start and end, params, metrics, datasets, the logged
model, registration), the registry (load, aliases, stages) and reading a run's logged
manifest. It imports model, evaluation, data, imaging and the top-level modules.
"""
