"""Temperature scaling, threshold rules and prior shift, against hand-worked numbers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.special import softmax
from torch import nn

from covid_xray.errors import UserError
from covid_xray.evaluation import metrics
from covid_xray.evaluation.calibration import (
    OperatingPoint,
    calibrate,
    choose_threshold,
    fit_operating_point,
    fit_temperature,
    parse_rule,
    predicted_classes,
    prior_shift,
    uncalibrated,
)
from covid_xray.evaluation.report import evaluate
from covid_xray.imaging.preprocess import Preprocessing
from covid_xray.imaging.workers import Decoded
from covid_xray.model.networks import Classifier
from covid_xray.model.pyfunc import DicomClassifier

# Six validation studies by score: negatives at 0.1, 0.3, 0.6; opacities at 0.4, 0.8, 0.9.
SCORES = np.array([0.1, 0.3, 0.4, 0.6, 0.8, 0.9])
LABELS = np.array([0, 0, 1, 0, 1, 1])


@pytest.mark.parametrize(("rule", "expected"), [
    # Thresholds from the top: 0.9 (sens 1/3, spec 1), 0.8 (2/3, 1), 0.6 (2/3, 2/3),
    # 0.4 (1, 2/3), 0.3 (1, 1/3), 0.1 (1, 0). Youden's J peaks at 0.8 and 0.4 (2/3): the
    # higher threshold is kept.
    ("youden", 0.8),
    ("sensitivity=0.95", 0.4),  # the highest threshold that finds every opacity
    ("sensitivity=0.6", 0.8),  # 2/3 >= 0.6 already at 0.8
    ("specificity=0.95", 0.8),  # the lowest threshold that clears every negative
    ("specificity=0.6", 0.4),  # spec 2/3 holds down to 0.4
])
def test_threshold_rules_pick_the_hand_worked_threshold(rule, expected):
    assert choose_threshold(LABELS, SCORES, rule) == expected


def test_a_validation_split_without_both_classes_keeps_one_half():
    assert choose_threshold(np.zeros(4, dtype=int), SCORES[:4], "youden") == 0.5


@pytest.mark.parametrize("rule", ["Youden", "sensitivity", "sensitivity=1.5", "specificity=x",
                                  "youden=0.9", "f1"])
def test_unknown_rules_are_refused_in_one_line(rule):
    with pytest.raises(UserError, match=r"operating_point must be youden, sensitivity=<0\.\.1>"):
        parse_rule(rule)


def test_temperature_recovers_how_overconfident_the_scores_are():
    """Outcomes drawn from softmax(z / 2), scores given as softmax(z): the fitted T is ~2."""
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3, size=(20_000, 2))
    truth = softmax(logits / 2, axis=1)
    labels = (rng.uniform(size=len(truth)) < truth[:, 1]).astype(int)
    assert fit_temperature(labels, softmax(logits, axis=1)) == pytest.approx(2, rel=0.05)


def test_calibration_on_val_lowers_ece_on_held_out_studies():
    rng = np.random.default_rng(1)
    logits = rng.normal(scale=3, size=(4_000, 2))
    labels = (rng.uniform(size=len(logits)) < softmax(logits / 2.5, axis=1)[:, 1]).astype(int)
    raw = softmax(logits, axis=1)
    val, test = slice(0, 2_000), slice(2_000, None)
    temperature = fit_temperature(labels[val], raw[val])
    calibrated = calibrate(raw[test], temperature)
    before = metrics.batched_ece(labels[test][None], raw[test][None])[0]
    after = metrics.batched_ece(labels[test][None], calibrated[None])[0]
    assert after < before / 2
    # Temperature never reorders: AUC is unchanged.
    assert metrics.roc_auc(labels[test], calibrated) == pytest.approx(
        metrics.roc_auc(labels[test], raw[test]), abs=1e-12)
    np.testing.assert_allclose(uncalibrated(calibrated, temperature), raw[test], atol=1e-9)


def test_evaluate_reports_both_calibrations_and_calls_at_the_threshold():
    probabilities = np.stack([1 - SCORES, SCORES], axis=1)
    temperature = 2.0
    answered = calibrate(probabilities, temperature)
    evaluation = evaluate(LABELS, answered, ("negative", "opacity"), resamples=0,
                          threshold=0.5, temperature=temperature)
    raw_ece = metrics.batched_ece(LABELS[None], probabilities[None])[0]
    assert evaluation.metrics["ece_uncalibrated"] == pytest.approx(raw_ece, abs=1e-9)
    assert evaluation.metrics["ece"] == pytest.approx(
        metrics.batched_ece(LABELS[None], answered[None])[0])
    # T = 2 keeps 0.5 where it is: calls as for the raw scores >= 0.5, i.e. 0.6, 0.8, 0.9.
    assert evaluation.metrics["sensitivity"] == pytest.approx(2 / 3)
    assert evaluation.metrics["specificity"] == pytest.approx(2 / 3)
    strict = evaluate(LABELS, answered, ("negative", "opacity"), resamples=0,
                      threshold=float(answered[4, 1]), temperature=temperature)
    assert strict.metrics["sensitivity"] == pytest.approx(2 / 3)  # 0.8 and 0.9
    assert strict.metrics["specificity"] == 1.0


def test_operating_point_holds_the_training_prevalence_and_no_threshold_for_four_classes():
    four = softmax(np.random.default_rng(2).normal(size=(8, 4)), axis=1)
    point = fit_operating_point(np.arange(8) % 4, four, 1.5, "youden",
                                np.array([0, 0, 0, 0, 1, 1, 2, 3]))
    assert point == OperatingPoint(1.5, None, "argmax", (0.5, 0.25, 0.125, 0.125))
    binary = fit_operating_point(LABELS, np.stack([1 - SCORES, SCORES], axis=1), 1.0,
                                 "youden", np.array([0, 1, 1, 1]))
    assert (binary.threshold, binary.training_prevalence) == (0.8, (0.25, 0.75))


def test_prior_shift_moves_probabilities_to_the_deployment_prevalence():
    # Trained at 50% opacity, deployed where 20% of films show one: an even answer becomes
    # 0.2, and the odds of any answer scale by (0.2 / 0.8) / (0.5 / 0.5) = 1/4.
    shifted = prior_shift(np.array([[0.5, 0.5], [0.2, 0.8]]), (0.5, 0.5), (0.8, 0.2))
    np.testing.assert_allclose(shifted, [[0.8, 0.2], [0.5, 0.5]])


def test_predicted_classes_follow_the_threshold_not_argmax():
    probabilities = np.array([[0.7, 0.3], [0.4, 0.6], [0.1, 0.9]])
    assert predicted_classes(probabilities, None).tolist() == [0, 1, 1]
    assert predicted_classes(probabilities, 0.25).tolist() == [1, 1, 1]
    assert predicted_classes(probabilities, 0.8).tolist() == [0, 0, 1]


class Fixed(nn.Module):
    """A 'network' answering fixed logits whatever the image."""

    def __init__(self, logits: list[float]):
        super().__init__()
        self.logits = torch.tensor([logits])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(len(x), -1)


def test_the_model_answers_calibrated_and_labels_at_its_threshold():
    network = Fixed([0.0, 1.0])  # P(opacity) = sigmoid(1) = 0.731 before calibration
    model = DicomClassifier(Classifier(network, ("negative", "opacity")),
                            Preprocessing(img_size=32))
    model.set_operating_point(OperatingPoint(temperature=2.0, threshold=0.65,
                                             operating_point="youden"))
    answer = model.forward(torch.zeros(2, 1, 32, 32))
    expected = 1 / (1 + np.exp(-0.5))  # sigmoid(1 / T)
    np.testing.assert_allclose(answer[:, 1], expected, rtol=1e-6)
    frame = model.result_frame(answer, decoded=[Decoded(None), Decoded(None)])
    assert frame.label.tolist() == ["negative", "negative"]  # 0.622 < 0.65, though > 0.5
    model.set_operating_point(OperatingPoint(temperature=2.0, threshold=0.6))
    frame = model.result_frame(model.forward(torch.zeros(1, 1, 32, 32)),
                                decoded=[Decoded(None)])
    pd.testing.assert_series_equal(frame.label, pd.Series(["opacity"], name="label"))


def test_the_model_answers_on_the_device_it_is_given():
    """CPU here; on CUDA the same call moves the network and runs bf16 autocast (not
    testable without a GPU: bench/predict.py measures it when one is lent)."""
    model = DicomClassifier(Classifier(Fixed([0.0, 1.0]), ("negative", "opacity")),
                            Preprocessing(img_size=32))
    assert model.to_device("auto").device.type == ("cuda" if torch.cuda.is_available()
                                                   else "cpu")
    answer = model.to_device("cpu").forward(torch.zeros(2, 1, 32, 32))
    np.testing.assert_allclose(answer[:, 1], 1 / (1 + np.exp(-1.0)), rtol=1e-6)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="device=cuda but no CUDA GPU is visible"):
            model.to_device("cuda")
    with pytest.raises(UserError, match="device must be one of auto, cpu, cuda, got 'gpu'"):
        model.to_device("gpu")


def test_a_table_of_no_rows_has_the_columns_and_types_of_a_full_one():
    """score_spark builds the rows of files Spark skipped; on a clean folder that is no rows,
    and its `error.str` raised (pandas typed the empty text columns as float)."""
    model = DicomClassifier(Classifier(Fixed([0.0, 1.0]), ("negative", "opacity")),
                            Preprocessing(img_size=32))
    full = model.result_frame(None, decoded=[Decoded(None, error="row 0: x", reason="unreadable")])
    empty = model.result_frame(None, decoded=[])
    pd.testing.assert_series_equal(empty.dtypes, full.dtypes)
    assert empty.error.str.replace("^row ", "", regex=True).tolist() == []
