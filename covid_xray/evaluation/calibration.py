"""What turns a network's scores into answers: temperature scaling and a decision threshold,
both fitted on the validation split after training and stored in the logged model.

Temperature scaling (Guo et al. 2017) divides the log-probabilities by one number T fitted to
minimise the validation log-loss: it changes how sure the model says it is, never its ranking
(AUC is unchanged). The threshold is the operating point of a binary model: a study is called
`opacity` when its calibrated P(opacity) is at least the threshold, chosen on validation by a
rule the user names (`youden`, `sensitivity=0.95`, `specificity=0.95`). A 4-class model keeps
argmax after temperature scaling.

Probabilities depend on the prevalence the model was trained at; `prior_shift` moves them to
another (Saerens et al. 2002), which is why the model also stores its training prevalence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax
from sklearn.metrics import roc_curve

from covid_xray.errors import UserError

RULES = ("youden", "sensitivity", "specificity")
ARGMAX = "argmax"  # the 4-class "rule": the most probable class


@dataclass(frozen=True)
class OperatingPoint:
    """What the logged model stores besides its weights (model.json)."""

    temperature: float = 1.0
    threshold: float | None = None  # binary only: P(opacity) >= threshold -> opacity
    operating_point: str = ARGMAX  # the rule that chose the threshold
    training_prevalence: tuple[float, ...] = ()  # each class's share of the training split

    def as_dict(self) -> dict:
        return {"temperature": self.temperature, "threshold": self.threshold,
                "operating_point": self.operating_point,
                "training_prevalence": list(self.training_prevalence)}


def parse_rule(text: str) -> tuple[str, float | None]:
    """'youden' -> ('youden', None); 'sensitivity=0.95' -> ('sensitivity', 0.95)."""
    name, _, value = text.strip().partition("=")
    if name == "youden" and not value:
        return name, None
    if name in ("sensitivity", "specificity"):
        try:
            target = float(value)
        except ValueError:
            target = math.nan
        if 0 < target < 1:
            return name, target
    raise UserError(f"operating_point must be youden, sensitivity=<0..1> or specificity=<0..1>"
                    f" (e.g. sensitivity=0.95), got {text!r}")


def calibrate(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T): the probabilities a model with temperature T answers."""
    logs = np.log(np.clip(np.asarray(probabilities, dtype=np.float64), 1e-300, None))
    return softmax(logs / temperature, axis=-1)


def uncalibrated(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """What the network said before temperature scaling (the inverse of `calibrate`)."""
    return calibrate(probabilities, 1.0 / temperature)


def fit_temperature(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """The T in [0.05, 20] that minimises the mean negative log-likelihood of `labels` under
    `calibrate(probabilities, T)`; 1.0 when there is nothing to fit (no labels)."""
    labels = np.asarray(labels)
    if len(labels) == 0:
        return 1.0
    logs = np.log(np.clip(np.asarray(probabilities, dtype=np.float64), 1e-300, None))

    def loss(log_temperature: float) -> float:
        scaled = log_softmax(logs / math.exp(log_temperature), axis=1)
        return float(-scaled[np.arange(len(labels)), labels].mean())

    # Searched in log T: the loss is smooth there, and T = 1 sits in the middle.
    found = minimize_scalar(loss, bounds=(math.log(0.05), math.log(20)), method="bounded",
                            options={"xatol": 1e-6})
    return float(math.exp(found.x))


def choose_threshold(labels: np.ndarray, scores: np.ndarray, rule: str) -> float:
    """The P(opacity) threshold the rule picks on (validation) labels and scores; a study is
    called opacity when its score is >= the threshold.

    youden: maximises sensitivity + specificity - 1. sensitivity=s: the highest threshold
    that still finds a fraction s of the opacities (so the most specific such one).
    specificity=s: the lowest threshold that still clears a fraction s of the negatives.
    A validation set without both classes cannot choose: 0.5, and the caller says so."""
    name, target = parse_rule(rule)
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    if len(np.unique(labels)) < 2:
        return 0.5
    fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    # thresholds[0] is +inf (nothing called opacity); the others are the scores, decreasing.
    fpr, tpr, thresholds = fpr[1:], tpr[1:], thresholds[1:]
    if name == "youden":
        # Rounded so that equal J (2/3 - 0 vs 1 - 1/3) ties exactly; argmax then keeps the
        # first, the highest threshold of the tie (fewer false alarms at equal J).
        index = int(np.argmax(np.round(tpr - fpr, 12)))
    elif name == "sensitivity":
        index = int(np.flatnonzero(tpr >= target - 1e-12)[0])
    else:
        index = int(np.flatnonzero(1 - fpr >= target - 1e-12)[-1])
    return float(thresholds[index])


def fit_operating_point(labels: np.ndarray, calibrated_probabilities: np.ndarray,
                        temperature: float, rule: str, training_labels: np.ndarray
                        ) -> OperatingPoint:
    """The operating point of a model answering `calibrated_probabilities` (temperature
    already applied) on the validation split: the rule's threshold (binary), and the
    training split's class shares."""
    num_classes = calibrated_probabilities.shape[1]
    counts = np.bincount(np.asarray(training_labels), minlength=num_classes)
    prevalence = tuple(round(float(share), 6) for share in counts / max(1, counts.sum()))
    if num_classes != 2:
        return OperatingPoint(temperature, None, ARGMAX, prevalence)
    threshold = choose_threshold(labels, calibrated_probabilities[:, 1], rule)
    return OperatingPoint(temperature, threshold, rule, prevalence)


def predicted_classes(probabilities: np.ndarray, threshold: float | None) -> np.ndarray:
    """The class each row is called: argmax, or for a binary model with a threshold,
    opacity (1) when P(opacity) >= threshold. Works on (..., classes) arrays."""
    if threshold is None or probabilities.shape[-1] != 2:
        return probabilities.argmax(axis=-1)
    return (probabilities[..., 1] >= threshold).astype(int)


def prior_shift(probabilities: np.ndarray, training_prevalence: tuple[float, ...],
                deployment_prevalence: tuple[float, ...]) -> np.ndarray:
    """Probabilities for a population whose class shares differ from training's: each class's
    probability times (new share / training share), renormalised (Saerens et al. 2002).
    A model trained on balanced classes (50% opacity) overstates opacity in a clinic where 20%
    of films show one; this corrects that without retraining."""
    ratio = np.asarray(deployment_prevalence, dtype=np.float64) / np.asarray(
        training_prevalence, dtype=np.float64)
    shifted = np.asarray(probabilities, dtype=np.float64) * ratio
    return shifted / shifted.sum(axis=-1, keepdims=True)
