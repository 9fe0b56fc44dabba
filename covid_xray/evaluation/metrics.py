"""Numbers and pictures from predictions: metrics (vectorised over bootstrap resamples, checked
against sklearn in tests/test_metrics.py) and matplotlib figures."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # figures go to files, never to a screen

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from scipy.stats import rankdata
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_curve,
)

from covid_xray.evaluation.calibration import predicted_classes

CALIBRATION_BINS = 10


def roc_auc(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Binary AUC of the positive class, or macro one-vs-rest AUC for more classes.

    NaN when a class is missing from `labels` (AUC is undefined there), so callers can tell.
    """
    return float(batched_roc_auc(np.asarray(labels)[None], np.asarray(probabilities)[None])[0])


def epoch_metrics(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """accuracy, auc and (macro) f1 for one pass over a split."""
    predicted = probabilities.argmax(axis=1)
    return {
        "accuracy": float(accuracy_score(labels, predicted)),
        "auc": roc_auc(labels, probabilities),
        "f1": float(f1_score(labels, predicted, average="macro", zero_division=0)),
    }


def per_class_metrics(labels: np.ndarray, probabilities: np.ndarray,
                      class_names: Sequence[str], threshold: float | None = None
                      ) -> dict[str, float]:
    """precision_<class>, recall_<class>, f1_<class> at the operating point (the threshold,
    else argmax)."""
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, predicted_classes(probabilities, threshold),
        labels=list(range(len(class_names))), zero_division=0)
    report = {}
    for index, name in enumerate(class_names):
        report[f"precision_{name}"] = float(precision[index])
        report[f"recall_{name}"] = float(recall[index])
        report[f"f1_{name}"] = float(f1[index])
    return report


# --- Metrics over many label sets at once: (resamples, n) labels, (resamples, n, classes) ---
# --- probabilities, one value per resample. The bootstrap scores 1000 resamples in a few  ---
# --- array operations instead of thousands of sklearn calls.                              ---

def batched(labels: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str],
            threshold: float | None = None) -> dict[str, np.ndarray]:
    """Every summary metric, one value per row: accuracy, balanced_accuracy, roc_auc,
    ap_<class>, map, (binary) sensitivity and specificity, ece, brier. Calls are made at the
    binary `threshold` on P(class 1) when given, else by argmax."""
    num_classes = len(class_names)
    correct = predicted_classes(probabilities, threshold) == labels
    present = np.stack([(labels == c).sum(axis=1) for c in range(num_classes)], axis=1)
    hits = np.stack([(correct & (labels == c)).sum(axis=1) for c in range(num_classes)], axis=1)
    recalls = hits / np.maximum(present, 1)
    values = {
        "accuracy": correct.mean(axis=1),
        # sklearn's balanced accuracy: the mean recall over the classes present.
        "balanced_accuracy": recalls.sum(axis=1) / (present > 0).sum(axis=1),
        "roc_auc": batched_roc_auc(labels, probabilities),
    }
    precisions = [batched_average_precision(probabilities[..., c], labels == c)
                  for c in range(num_classes)]
    values |= {f"ap_{name}": value for name, value in zip(class_names, precisions, strict=True)}
    values["map"] = np.mean(precisions, axis=0)
    if num_classes == 2:
        values["sensitivity"], values["specificity"] = recalls[:, 1], recalls[:, 0]
    values["ece"] = batched_ece(labels, probabilities)
    values["brier"] = batched_brier(labels, probabilities)
    return values


def batched_binary_auc(scores: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUC per row, ties counted half (as sklearn's roc_auc_score); NaN where a
    row lacks positives or negatives."""
    ranks = rankdata(scores, axis=1)
    positives = truth.sum(axis=1)
    negatives = truth.shape[1] - positives
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((ranks * truth).sum(axis=1) - positives * (positives + 1) / 2) / (
            positives * negatives)


def batched_roc_auc(labels: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Positive-class AUC (2 classes) or macro one-vs-rest AUC (more) per row."""
    num_classes = probabilities.shape[-1]
    if num_classes == 2:
        return batched_binary_auc(probabilities[..., 1], labels == 1)
    return np.mean([batched_binary_auc(probabilities[..., c], labels == c)
                    for c in range(num_classes)], axis=0)


def batched_average_precision(scores: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Average precision per row, as sklearn computes it: over distinct thresholds from the
    top score down, the sum of (recall gained) x (precision there). Tied scores are one
    threshold. NaN where a row has no positive."""
    order = np.argsort(-scores, axis=1, kind="stable")
    ranked = np.take_along_axis(scores, order, axis=1)
    true_positives = np.take_along_axis(truth, order, axis=1).cumsum(axis=1)
    precision = true_positives / np.arange(1, scores.shape[1] + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = true_positives / true_positives[:, -1:]
    # A threshold sits at the last position of each run of tied scores.
    is_threshold = np.ones(scores.shape, dtype=bool)
    is_threshold[:, :-1] = ranked[:, 1:] != ranked[:, :-1]
    # Recall at the previous threshold: recall only grows, so a running maximum finds it.
    reached = np.maximum.accumulate(np.where(is_threshold, recall, 0.0), axis=1)
    previous = np.concatenate([np.zeros((len(scores), 1)), reached[:, :-1]], axis=1)
    return np.where(is_threshold, (recall - previous) * precision, 0.0).sum(axis=1)


def calibration_target(labels: np.ndarray, probabilities: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
    """What calibration compares: (predicted probability, observed outcome as 0/1).

    Binary: P(class 1) against being class 1, the risk score a reader acts on. More
    classes: the top class's probability against being right (top-label calibration).
    """
    if probabilities.shape[-1] == 2:
        return probabilities[..., 1], (labels == 1).astype(np.float64)
    correct = probabilities.argmax(axis=-1) == labels
    return probabilities.max(axis=-1), correct.astype(np.float64)


def batched_ece(labels: np.ndarray, probabilities: np.ndarray,
                bins: int = CALIBRATION_BINS) -> np.ndarray:
    """Expected calibration error per row: over equal-width probability bins, |observed
    frequency - mean predicted probability|, weighted by the bin's share of studies."""
    predicted, observed = calibration_target(labels, probabilities)
    which = np.minimum((predicted * bins).astype(int), bins - 1)
    error = np.zeros(len(predicted))
    for index in range(bins):
        members = which == index
        error += np.abs((observed * members).sum(axis=1) - (predicted * members).sum(axis=1))
    return error / predicted.shape[1]


def batched_brier(labels: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Brier score per row. Binary: mean (P(class 1) - outcome)^2. More classes: mean over
    studies of the squared distance to the one-hot truth (summed over classes)."""
    if probabilities.shape[-1] == 2:
        return ((probabilities[..., 1] - (labels == 1)) ** 2).mean(axis=1)
    onehot = labels[..., None] == np.arange(probabilities.shape[-1])
    return ((probabilities - onehot) ** 2).sum(axis=-1).mean(axis=1)


def confusion_figure(labels: np.ndarray, probabilities: np.ndarray,
                     class_names: Sequence[str], threshold: float | None = None) -> Figure:
    """Counts and row-normalised rates side by side, class names on both axes, at the
    operating point (the threshold, else argmax)."""
    counts = confusion_matrix(labels, predicted_classes(probabilities, threshold),
                              labels=list(range(len(class_names))))
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = np.nan_to_num(counts / counts.sum(axis=1, keepdims=True))
    figure, axes = plt.subplots(1, 2, figsize=(5 + 2 * len(class_names), 3 + len(class_names)))
    for axis, matrix, title, text in ((axes[0], counts, "counts", "{:d}"),
                                      (axes[1], rates, "normalised by true class", "{:.2f}")):
        axis.imshow(matrix, cmap="Blues", vmin=0)
        _label_matrix(axis, matrix, text, class_names, class_names)
        axis.set(title=title, xlabel="predicted", ylabel="true")
    figure.tight_layout()
    return figure


def per_class_figure(report: dict[str, float], class_names: Sequence[str],
                     title: str = "test") -> Figure:
    """Heatmap of precision / recall / F1 per class."""
    rows = ("precision", "recall", "f1")
    matrix = np.array([[report[f"{row}_{name}"] for name in class_names] for row in rows])
    figure, axis = plt.subplots(figsize=(2 + 1.5 * len(class_names), 3))
    axis.imshow(matrix, cmap="RdYlGn", vmin=0, vmax=1)
    _label_matrix(axis, matrix, "{:.2f}", class_names, rows)
    axis.set_title(f"{title} precision / recall / F1")
    figure.tight_layout()
    return figure


def roc_figure(labels: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str],
               band_rows: np.ndarray | None = None, title: str = "test") -> Figure:
    """One-vs-rest ROC curve per class (just class 1 when binary), each with its
    95% bootstrap band when `band_rows` (resampled row indices, one resample a row) are given."""
    figure, axis = plt.subplots(figsize=(5.5, 5.5))
    grid = np.linspace(0, 1, 101)
    for index in [1] if len(class_names) == 2 else range(len(class_names)):
        truth = labels == index
        if truth.all() or not truth.any():
            continue  # undefined for a class absent from (or alone in) the set
        scores = probabilities[:, index]
        area = batched_binary_auc(scores[None], truth[None])[0]
        line, = axis.plot(*roc_curve(truth, scores)[:2],
                          label=f"{class_names[index]} (AUC {area:.3f})")
        if band_rows is not None:
            curves = [np.interp(grid, *roc_curve(truth[rows], scores[rows])[:2])
                      for rows in band_rows]
            low, high = np.percentile(curves, [2.5, 97.5], axis=0)
            axis.fill_between(grid, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    axis.plot([0, 1], [0, 1], "k--", linewidth=0.8, label="chance")
    band = " (shaded: 95% bootstrap band)" if band_rows is not None else ""
    axis.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{title} ROC{band}",
             xlim=(0, 1), ylim=(0, 1.01))
    axis.legend(loc="lower right")
    figure.tight_layout()
    return figure


def reliability_figure(labels: np.ndarray, probabilities: np.ndarray,
                       class_names: Sequence[str], title: str = "test",
                       bins: int = CALIBRATION_BINS) -> Figure:
    """Reliability diagram: observed frequency against mean predicted probability per bin (on
    the diagonal = calibrated), and how many studies each bin holds underneath."""
    predicted, observed = calibration_target(labels, probabilities)
    which = np.minimum((predicted * bins).astype(int), bins - 1)
    counts = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_predicted = np.bincount(which, predicted, bins) / counts
        frequency = np.bincount(which, observed, bins) / counts
    ece = batched_ece(labels[None], probabilities[None], bins)[0]
    if len(class_names) == 2:
        x_label, y_label = f"predicted P({class_names[1]})", f"observed fraction {class_names[1]}"
    else:
        x_label, y_label = "top-class probability", "observed fraction correct"
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(5.5, 6.5), sharex=True,
                                         gridspec_kw={"height_ratios": [3, 1]})
    edges = np.linspace(0, 1, bins + 1)
    top.bar(edges[:-1], np.nan_to_num(frequency), width=1 / bins, align="edge",
            edgecolor="black", alpha=0.6, label="observed, per bin")
    top.plot(mean_predicted, frequency, "o", color="black", label="at mean predicted")
    top.plot([0, 1], [0, 1], "k--", linewidth=0.8, label="perfectly calibrated")
    top.set(ylabel=y_label, ylim=(0, 1.02), title=f"{title} reliability (ECE {ece:.3f})")
    top.legend(loc="upper left")
    bottom.bar(edges[:-1], counts, width=1 / bins, align="edge", edgecolor="black")
    bottom.set(xlabel=x_label, ylabel="studies", xlim=(0, 1))
    figure.tight_layout()
    return figure


def learning_curves_figure(history: Sequence[dict[str, float]]) -> Figure:
    """Train vs val loss, accuracy and AUC per epoch."""
    epochs = [row["epoch"] for row in history]
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for axis, metric in zip(axes, ("loss", "accuracy", "auc"), strict=True):
        for split in ("train", "val"):
            axis.plot(epochs, [row[f"{split}_{metric}"] for row in history], marker="o",
                      label=split)
        axis.set(title=metric, xlabel="epoch")
        axis.legend()
    figure.tight_layout()
    return figure


def _label_matrix(axis, matrix: np.ndarray, text: str, columns: Sequence[str],
                  rows: Sequence[str]) -> None:
    axis.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
    axis.set_yticks(range(len(rows)), rows)
    threshold = matrix.max() / 2 if matrix.size else 0
    for (row, column), value in np.ndenumerate(matrix):
        axis.text(column, row, text.format(value), ha="center", va="center",
                  color="white" if value > threshold else "black")
