"""Numbers and pictures from predictions: sklearn metrics, matplotlib figures."""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # figures go to files, never to a screen

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)


def roc_auc(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Binary AUC of the positive class, or macro one-vs-rest AUC for more classes.

    NaN when a class is missing from `labels` (AUC is undefined there), so callers can tell.
    """
    num_classes = probabilities.shape[1]
    if len(np.unique(labels)) < num_classes:
        return math.nan
    if num_classes == 2:
        return float(roc_auc_score(labels, probabilities[:, 1]))
    return float(roc_auc_score(labels, probabilities, multi_class="ovr", average="macro",
                               labels=list(range(num_classes))))


def epoch_metrics(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """accuracy, auc and (macro) f1 for one pass over a split."""
    predicted = probabilities.argmax(axis=1)
    return {
        "accuracy": float(accuracy_score(labels, predicted)),
        "auc": roc_auc(labels, probabilities),
        "f1": float(f1_score(labels, predicted, average="macro", zero_division=0)),
    }


def final_metrics(labels: np.ndarray, probabilities: np.ndarray,
                 class_names: Sequence[str]) -> dict[str, float]:
    """The final report: accuracy, balanced accuracy, ROC AUC, per-class P/R/F1."""
    predicted = probabilities.argmax(axis=1)
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, predicted, labels=list(range(len(class_names))), zero_division=0)
    report = {
        "accuracy": float(accuracy_score(labels, predicted)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, predicted)),
        "roc_auc": roc_auc(labels, probabilities),
    }
    for index, name in enumerate(class_names):
        report[f"precision_{name}"] = float(precision[index])
        report[f"recall_{name}"] = float(recall[index])
        report[f"f1_{name}"] = float(f1[index])
    return report


def confusion_figure(labels: np.ndarray, probabilities: np.ndarray,
                     class_names: Sequence[str]) -> Figure:
    """Counts and row-normalised rates side by side, class names on both axes."""
    counts = confusion_matrix(labels, probabilities.argmax(axis=1),
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


def per_class_figure(report: dict[str, float], class_names: Sequence[str]) -> Figure:
    """Heatmap of precision / recall / F1 per class."""
    rows = ("precision", "recall", "f1")
    matrix = np.array([[report[f"{row}_{name}"] for name in class_names] for row in rows])
    figure, axis = plt.subplots(figsize=(2 + 1.5 * len(class_names), 3))
    axis.imshow(matrix, cmap="RdYlGn", vmin=0, vmax=1)
    _label_matrix(axis, matrix, "{:.2f}", class_names, rows)
    axis.set_title("test precision / recall / F1")
    figure.tight_layout()
    return figure


def roc_figure(labels: np.ndarray, probabilities: np.ndarray,
               class_names: Sequence[str]) -> Figure:
    """One-vs-rest ROC curve per class (just the positive class when binary)."""
    figure, axis = plt.subplots(figsize=(5, 5))
    shown = [1] if len(class_names) == 2 else range(len(class_names))
    for index in shown:
        truth = labels == index
        if truth.all() or not truth.any():
            continue  # undefined for a class absent from (or alone in) the split
        false_positive, true_positive, _ = roc_curve(truth, probabilities[:, index])
        area = roc_auc_score(truth, probabilities[:, index])
        axis.plot(false_positive, true_positive, label=f"{class_names[index]} (AUC {area:.3f})")
    axis.plot([0, 1], [0, 1], "k--", linewidth=0.8, label="chance")
    axis.set(xlabel="false positive rate", ylabel="true positive rate", title="test ROC",
             xlim=(0, 1), ylim=(0, 1.01))
    axis.legend(loc="lower right")
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
