"""Metrics, bootstrap CIs and calibration: against sklearn, and against hand computations."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
from scipy.stats import binom
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    roc_auc_score,
)

from covid_xray.evaluation.report import (
    bootstrap_indices,
    confidence_intervals,
    evaluate,
    metrics,
    paired_difference,
)

BINARY = ("negative", "opacity")


@pytest.fixture(autouse=True)
def close_figures():
    """evaluate() draws figures that tracking/mlflow_run.py would log and close; here nobody logs them."""
    yield
    plt.close("all")

FOUR = ("negative", "typical", "indeterminate", "atypical")


def random_predictions(num_classes: int, n: int, seed: int, decimals: int | None = None):
    """Labels and softmax-like probabilities that carry some signal; rounding makes ties."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    logits = rng.normal(size=(n, num_classes)) + 1.5 * np.eye(num_classes)[labels]
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    if decimals is not None:
        probabilities = np.round(probabilities, decimals)
    return labels, probabilities


@pytest.mark.parametrize("decimals", [None, 1])  # 1 decimal: many tied scores
@pytest.mark.parametrize("seed", [0, 1])
def test_batched_metrics_equal_sklearn(seed, decimals):
    for class_names in (BINARY, FOUR):
        labels, probabilities = random_predictions(len(class_names), 300, seed, decimals)
        values = {key: float(value[0]) for key, value in
                  metrics.batched(labels[None], probabilities[None], class_names).items()}
        predicted = probabilities.argmax(axis=1)
        assert values["accuracy"] == pytest.approx(accuracy_score(labels, predicted))
        assert values["balanced_accuracy"] == pytest.approx(
            balanced_accuracy_score(labels, predicted))
        if len(class_names) == 2:
            expected_auc = roc_auc_score(labels, probabilities[:, 1])
        else:  # macro one-vs-rest (sklearn's own form wants rows summing to 1: not rounded)
            expected_auc = np.mean([roc_auc_score(labels == c, probabilities[:, c])
                                    for c in range(4)])
            if decimals is None:
                assert expected_auc == pytest.approx(roc_auc_score(
                    labels, probabilities, multi_class="ovr", average="macro"), abs=1e-12)
        assert values["roc_auc"] == pytest.approx(expected_auc, abs=1e-12)
        precisions = [average_precision_score(labels == c, probabilities[:, c])
                      for c in range(len(class_names))]
        for name, expected in zip(class_names, precisions, strict=True):
            assert values[f"ap_{name}"] == pytest.approx(expected, abs=1e-12)
        assert values["map"] == pytest.approx(np.mean(precisions), abs=1e-12)


def test_each_row_is_its_own_label_set():
    """The batched form scores every resample separately (no mixing across rows)."""
    labels, probabilities = random_predictions(4, 120, seed=3)
    rows = bootstrap_indices(labels, 5, seed=0)
    batch = metrics.batched(labels[rows], probabilities[rows], FOUR)
    for index, row in enumerate(rows):
        single = metrics.batched(labels[row][None], probabilities[row][None], FOUR)
        for name, values in batch.items():
            assert values[index] == pytest.approx(single[name][0], abs=1e-12)


def test_sensitivity_specificity_ece_brier_by_hand():
    labels = np.array([0, 1, 1, 1, 0])
    positive = np.array([0.1, 0.1, 0.9, 0.9, 0.65])
    probabilities = np.stack([1 - positive, positive], axis=1)
    values = {key: float(value[0]) for key, value in
              metrics.batched(labels[None], probabilities[None], BINARY).items()}
    # Operating point argmax: predicted positive = [0, 0, 1, 1, 1].
    assert values["sensitivity"] == pytest.approx(2 / 3)
    assert values["specificity"] == pytest.approx(1 / 2)
    # Bins of P(positive): 0.1 x2 (1 positive: |1 - 0.2|), 0.9 x2 (|2 - 1.8|), 0.65 (|0 - 0.65|).
    assert values["ece"] == pytest.approx((0.8 + 0.2 + 0.65) / 5)
    assert values["brier"] == pytest.approx((0.01 + 0.81 + 0.01 + 0.01 + 0.4225) / 5)


def test_four_class_calibration_is_top_label():
    labels = np.array([0, 1, 2, 3])
    probabilities = np.array([[0.7, 0.1, 0.1, 0.1],   # right, confidence 0.7
                              [0.7, 0.1, 0.1, 0.1],   # wrong, confidence 0.7
                              [0.1, 0.1, 0.4, 0.4],   # right (first max), confidence 0.4
                              [0.25, 0.25, 0.25, 0.25]])  # wrong, confidence 0.25
    ece = metrics.batched_ece(labels[None], probabilities[None])[0]
    # Bin 7: observed 1 of 2, predicted 1.4; bin 4: 1 vs 0.4; bin 2: 0 vs 0.25.
    assert ece == pytest.approx((abs(1 - 1.4) + abs(1 - 0.4) + abs(0 - 0.25)) / 4)
    brier = metrics.batched_brier(labels[None], probabilities[None])[0]
    expected = np.mean([((p - np.eye(4)[y]) ** 2).sum() for p, y in
                        zip(probabilities, labels, strict=True)])
    assert brier == pytest.approx(expected)


def test_perfectly_calibrated_predictions_have_small_ece():
    rng = np.random.default_rng(0)
    positive = rng.uniform(size=200_000)
    labels = (rng.uniform(size=positive.size) < positive).astype(int)
    probabilities = np.stack([1 - positive, positive], axis=1)
    assert metrics.batched_ece(labels[None], probabilities[None])[0] < 0.01
    overconfident = np.stack([1 - (positive > 0.5), positive > 0.5], axis=1).astype(float)
    assert metrics.batched_ece(labels[None], overconfident[None])[0] > 0.2


def test_bootstrap_keeps_each_class_count():
    labels = np.array([0] * 30 + [1] * 10 + [2] * 5)
    rows = bootstrap_indices(labels, 50, seed=1)
    assert rows.shape == (50, 45)
    for row in rows:
        assert np.bincount(labels[row], minlength=3).tolist() == [30, 10, 5]
    np.testing.assert_array_equal(rows, bootstrap_indices(labels, 50, seed=1))


def test_accuracy_interval_matches_the_binomial_by_hand():
    """100 negatives all right, 100 positives half right: a stratified resample's accuracy is
    (100 + X) / 200 with X ~ Binomial(100, 0.5), so the 95% interval is known exactly."""
    labels = np.array([0] * 100 + [1] * 100)
    right = np.r_[np.zeros(100), np.tile([1.0, 0.0], 50)]  # P(positive) per study
    probabilities = np.stack([1 - right, right], axis=1)
    probabilities[100:] = np.where(right[100:, None] == 1, [0.2, 0.8], [0.8, 0.2])
    probabilities[:100] = [0.9, 0.1]
    low, high = confidence_intervals(labels, probabilities, BINARY, 4000, seed=0)["accuracy"]
    expected_low = (100 + binom.ppf(0.025, 100, 0.5)) / 200  # 0.70
    expected_high = (100 + binom.ppf(0.975, 100, 0.5)) / 200  # 0.80
    assert low == pytest.approx(expected_low, abs=0.006)
    assert high == pytest.approx(expected_high, abs=0.006)
    assert high - low == pytest.approx(expected_high - expected_low, abs=0.011)


def test_evaluation_intervals_are_the_percentiles_of_the_resampled_metrics():
    """What a percentile bootstrap guarantees, and nothing more: each bound is a percentile of
    the metric over the seeded resamples (recomputed here resample by resample), so the bounds
    are ordered and inside the metric's range. (Not that the point estimate lies between
    them: for a biased statistic such as ECE it need not.)"""
    for class_names in (BINARY, FOUR):
        labels, probabilities = random_predictions(len(class_names), 200, seed=5)
        report = evaluate(labels, probabilities, class_names, resamples=300, seed=2).metrics
        for name in ("roc_auc", "accuracy", "balanced_accuracy", "map", "ece", "brier"):
            low, high = report[f"{name}_ci_low"], report[f"{name}_ci_high"]
            assert 0 <= low < high <= (2 if name == "brier" else 1), name
        rows = bootstrap_indices(labels, 300, 2)
        accuracies = [np.mean(probabilities[r].argmax(axis=1) == labels[r]) for r in rows]
        assert (report["accuracy_ci_low"], report["accuracy_ci_high"]) == pytest.approx(
            tuple(np.percentile(accuracies, [2.5, 97.5])), abs=1e-12)
        if len(class_names) == 2:
            assert {"sensitivity_ci_low", "specificity_ci_high"} <= set(report)
        assert {f"precision_{name}" for name in class_names} <= set(report)
        again = evaluate(labels, probabilities, class_names, resamples=300, seed=2).metrics
        assert again == report  # seeded: the same intervals every time


def test_evaluation_figures_are_drawn():
    labels, probabilities = random_predictions(4, 80, seed=6)
    figures = evaluate(labels, probabilities, FOUR, resamples=50).figures
    assert set(figures) == {"confusion_matrix", "per_class_prf1", "roc_curves", "reliability"}
    roc_axis = figures["roc_curves"].axes[0]
    assert len(roc_axis.lines) == 5 and len(roc_axis.collections) == 4  # 4 curves + chance, bands
    assert "ECE" in figures["reliability"].axes[0].get_title()


def test_paired_difference_is_the_bootstrap_of_differences_on_shared_resamples():
    """Each resample scores both models on the same studies: the interval is the percentile
    interval of the per-resample differences, computed here study by study with sklearn."""
    labels, first = random_predictions(2, 120, seed=8)
    second = np.clip(first + np.random.default_rng(9).normal(0, 0.15, first.shape), 0, 1)
    second /= second.sum(axis=1, keepdims=True)
    paired = paired_difference(labels, first, second, BINARY, "roc_auc", resamples=150, seed=4)
    deltas = [roc_auc_score(labels[rows], first[rows, 1]) - roc_auc_score(labels[rows],
                                                                          second[rows, 1])
              for rows in bootstrap_indices(labels, 150, 4)]
    assert paired.difference == pytest.approx(roc_auc_score(labels, first[:, 1])
                                              - roc_auc_score(labels, second[:, 1]), abs=1e-12)
    assert (paired.ci_low, paired.ci_high) == pytest.approx(
        tuple(np.percentile(deltas, [2.5, 97.5])), abs=1e-12)
    assert paired.count == 120
    same = paired_difference(labels, first, first, BINARY, "ece", resamples=50)
    assert (same.difference, same.ci_low, same.ci_high) == (0.0, 0.0, 0.0)
