"""Evaluation the way medical-imaging papers report it: every number with its 95% confidence
interval, calibration beside discrimination, and the pictures that show both.

One function serves train's test split and the evaluate entry point (any labelled set):
labels and probabilities in, an `Evaluation` (numbers and figures) out. No MLflow in here;
tracking/mlflow_run.py logs what it returns.

Confidence intervals come from a stratified bootstrap: each resample draws, with replacement,
as many studies of each class as the set holds, so the class mix (and every AUC) stays defined.
The metrics are computed for all resamples at once (`metrics.batched`), which makes 1000
resamples cost about what one sklearn call per resample would cost for ten.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from covid_xray.evaluation import metrics
from covid_xray.evaluation.calibration import uncalibrated

RESAMPLES = 1000
CONFIDENCE = 0.95
CHUNK = 100  # resamples scored at a time: bounds memory on large sets (6,000 studies x 4 classes)


@dataclass
class Evaluation:
    """Point estimates with `<name>_ci_low` / `<name>_ci_high`, and the figures."""

    metrics: dict[str, float]
    figures: dict[str, Figure] = field(default_factory=dict)
    count: int = 0
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)  # logged as <name>.csv

    def line(self, name: str) -> str:
        """'roc_auc 0.912 (95% CI 0.874-0.945)', for printing."""
        value = self.metrics[name]
        low, high = self.metrics.get(f"{name}_ci_low"), self.metrics.get(f"{name}_ci_high")
        interval = f" (95% CI {low:.3f}-{high:.3f})" if low is not None else ""
        return f"{name} {value:.3f}{interval}"


def bootstrap_indices(labels: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) row indices, each row a stratified resample with replacement."""
    rng = np.random.default_rng(seed)
    parts = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        parts.append(members[rng.integers(0, len(members), size=(resamples, len(members)))])
    return np.concatenate(parts, axis=1)


def resample_chunks(labels: np.ndarray, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """The stratified resamples' row indices, CHUNK resamples at a time (bounds memory)."""
    indices = bootstrap_indices(labels, resamples, seed)
    for start in range(0, resamples, CHUNK):
        yield indices[start : start + CHUNK]


def percentile_interval(samples: np.ndarray) -> tuple[float, float]:
    """The central 95% of bootstrap samples (NaN ones, undefined on a resample, left out)."""
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.nanpercentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_samples(labels: np.ndarray, probabilities: np.ndarray,
                      class_names: Sequence[str], resamples: int = RESAMPLES, seed: int = 0,
                      threshold: float | None = None) -> dict[str, np.ndarray]:
    """Every `metrics.batched` metric on each of the stratified resamples (NaN where a
    resample leaves it undefined)."""
    values: dict[str, list[np.ndarray]] = {}
    for rows in resample_chunks(labels, resamples, seed):
        for name, batch in metrics.batched(labels[rows], probabilities[rows], class_names,
                                           threshold).items():
            values.setdefault(name, []).append(batch)
    return {name: np.concatenate(parts) for name, parts in values.items()}


def confidence_intervals(labels: np.ndarray, probabilities: np.ndarray,
                         class_names: Sequence[str], resamples: int = RESAMPLES,
                         seed: int = 0, threshold: float | None = None,
                         samples: dict[str, np.ndarray] | None = None
                         ) -> dict[str, tuple[float, float]]:
    """Percentile intervals of every `metrics.batched` metric over stratified resamples
    (`bootstrap_samples`, drawn here unless given)."""
    if samples is None:
        samples = bootstrap_samples(labels, probabilities, class_names, resamples, seed,
                                    threshold)
    return {name: percentile_interval(drawn) for name, drawn in samples.items()
            if not np.isnan(drawn).all()}  # undefined on this set: no interval either


def evaluate(labels: Sequence[int], probabilities: np.ndarray, class_names: Sequence[str], *,
             resamples: int = RESAMPLES, seed: int = 0, title: str = "test",
             threshold: float | None = None, temperature: float = 1.0) -> Evaluation:
    """All numbers and figures for one labelled set, from the probabilities the model answers
    (calibrated by its `temperature`).

    Metrics: accuracy, balanced_accuracy, roc_auc (macro one-vs-rest for 4 classes), ap_<class>
    and map (their mean: SIIM's study-level metric), sensitivity and specificity at the
    model's operating point (P(opacity) >= `threshold`; argmax without one) for binary models,
    ece and brier (calibration) and the same two before temperature scaling
    (ece_uncalibrated, brier_uncalibrated), per-class precision / recall / F1; CIs for every
    metric that has one.
    """
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    report = metrics.per_class_metrics(labels, probabilities, class_names, threshold)
    point = metrics.batched(labels[None], probabilities[None], class_names, threshold)
    report |= {name: float(values[0]) for name, values in point.items()}
    raw = uncalibrated(probabilities, temperature)[None]
    report["ece_uncalibrated"] = float(metrics.batched_ece(labels[None], raw)[0])
    report["brier_uncalibrated"] = float(metrics.batched_brier(labels[None], raw)[0])
    if resamples > 0:
        for name, (low, high) in confidence_intervals(labels, probabilities, class_names,
                                                      resamples, seed, threshold).items():
            report[f"{name}_ci_low"], report[f"{name}_ci_high"] = low, high
    band_rows = bootstrap_indices(labels, min(resamples, 200), seed + 1) if resamples else None
    figures = {
        "confusion_matrix": metrics.confusion_figure(labels, probabilities, class_names,
                                                     threshold),
        "per_class_prf1": metrics.per_class_figure(report, class_names, title),
        "roc_curves": metrics.roc_figure(labels, probabilities, class_names, band_rows, title),
        "reliability": metrics.reliability_figure(labels, probabilities, class_names, title),
    }
    return Evaluation(report, figures, len(labels))


@dataclass
class PairedDifference:
    """`metric` of one model minus another's on the same studies, with its 95% interval."""

    metric: str
    difference: float
    ci_low: float
    ci_high: float
    count: int  # studies both models were scored on

    def line(self) -> str:
        return (f"{self.metric} difference {self.difference:+.4f} (95% CI {self.ci_low:+.4f} "
                f"to {self.ci_high:+.4f}, paired over {self.count} studies)")


def paired_difference(labels: Sequence[int], first: np.ndarray, second: np.ndarray,
                      class_names: Sequence[str], metric: str, *,
                      resamples: int = RESAMPLES, seed: int = 0,
                      thresholds: tuple[float | None, float | None] = (None, None)
                      ) -> PairedDifference:
    """first's `metric` minus second's, both scored on the same studies, with a percentile
    interval from a paired stratified bootstrap: every resample draws the same studies for
    both models. Two models answer alike on most films, so their errors are correlated, and
    the interval of the difference is much narrower (and honest) than two separate
    intervals that merely overlap or not. Each model calls classes at its own threshold."""
    labels = np.asarray(labels)
    first, second = (np.asarray(p, dtype=np.float64) for p in (first, second))

    def score(rows: np.ndarray, probabilities: np.ndarray, threshold: float | None
              ) -> np.ndarray:
        return metrics.batched(labels[rows], probabilities[rows], class_names,
                               threshold)[metric]

    def difference_on(rows: np.ndarray) -> np.ndarray:
        return score(rows, first, thresholds[0]) - score(rows, second, thresholds[1])

    difference = float(difference_on(np.arange(len(labels))[None])[0])
    samples = np.concatenate([difference_on(rows)
                              for rows in resample_chunks(labels, resamples, seed)])
    return PairedDifference(metric, difference, *percentile_interval(samples), len(labels))
