"""How far a film is from what the model was trained on: the Mahalanobis distance of its
penultimate features (the pooled vector the classifier head reads) to the training films'.

A model answers something for any input, a photograph included; the distance says when that
answer rests on nothing it has seen. Fitted after training: the mean and a shrunk covariance
(Ledoit-Wolf: 1,024 features from a few hundred films would give a singular one) of the
training split's features, and a threshold at the 99th percentile of the validation split's
distances, so about 1 in 100 films like the validation films is flagged. Stored in the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PERCENTILE = 99.0


@dataclass(frozen=True)
class FeatureDistance:
    mean: np.ndarray  # (features,)
    precision: np.ndarray  # (features, features): the inverse of the shrunk covariance
    threshold: float  # distances above it are out of distribution

    def scores(self, features: np.ndarray) -> np.ndarray:
        """The Mahalanobis distance of each row of `features`."""
        centred = np.asarray(features, dtype=np.float64) - self.mean
        return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", centred, self.precision,
                                            centred), 0.0))

    def as_arrays(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean, "precision": self.precision,
                "threshold": np.array(self.threshold)}

    @classmethod
    def from_arrays(cls, arrays: dict) -> FeatureDistance:
        return cls(np.asarray(arrays["mean"], dtype=np.float64),
                   np.asarray(arrays["precision"], dtype=np.float64),
                   float(arrays["threshold"]))


def fit_feature_distance(train_features: np.ndarray, val_features: np.ndarray,
                         percentile: float = PERCENTILE) -> FeatureDistance:
    """Mean and Ledoit-Wolf precision of the training features; threshold at `percentile` of
    the validation features' distances."""
    from sklearn.covariance import LedoitWolf  # training only; a served model never fits

    estimate = LedoitWolf().fit(np.asarray(train_features, dtype=np.float64))
    fitted = FeatureDistance(estimate.location_, estimate.precision_, np.inf)
    threshold = float(np.percentile(fitted.scores(val_features), percentile))
    return FeatureDistance(fitted.mean, fitted.precision, threshold)
