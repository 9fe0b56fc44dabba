"""Subgroup tables: does the model work as well for every kind of patient and film?

One overall AUC can hide a group the model fails: women, children, bedside (AP) films, one
vendor's detectors. From each study's DICOM header (read once with its PatientID and kept in
the cache's memo) the studies are grouped by PatientSex, an age band from PatientAge,
ViewPosition and Manufacturer. For each group with at least `MIN_STUDIES` studies and both
outcomes: n, prevalence, AUC, and (binary) sensitivity and specificity at the model's stored
threshold, each with a stratified bootstrap 95% interval; smaller groups get n only (an AUC on
a dozen studies is noise).

A group is flagged (`auc_below_overall`) when its AUC is below the overall AUC after
adjusting for the number of groups compared: a one-sided bootstrap p-value per group (the
share of its resamples whose AUC reaches the overall AUC), Holm-adjusted across the groups of
one table (`auc_below_p_holm`), flagged under `FAMILY_ALPHA`. Without the adjustment, a table
of a dozen groups flagged one falsely about a quarter of the time; with it, at most 5% of
tables with no real difference have any flag (tests/test_subgroups.py simulates 100).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib import pyplot as plt
from matplotlib.figure import Figure

from covid_xray.evaluation import metrics
from covid_xray.evaluation.report import Evaluation, bootstrap_samples, confidence_intervals

MIN_STUDIES = 30
FAMILY_ALPHA = 0.05  # the chance that a table with no real difference flags any group
AGE_BANDS = ((18, "<18"), (40, "18-39"), (65, "40-64"), (np.inf, ">=65"))
COLUMNS = ["attribute", "value", "n", "prevalence", "roc_auc", "roc_auc_ci_low",
           "roc_auc_ci_high", "sensitivity", "specificity"]
EXTRA_COLUMNS = ["sensitivity_ci_low", "sensitivity_ci_high", "specificity_ci_low",
                 "specificity_ci_high", "auc_below_p_holm", "auc_below_overall"]
MISSING = "missing"
# DICOM's age string: three digits and a unit (days, weeks, months, years).
AGE = re.compile(r"(\d{3})([DWMY])")
DAYS_PER = {"D": 1, "W": 7, "M": 365.25 / 12, "Y": 365.25}


def age_band(age: str) -> str:
    """'045Y' -> '40-64'; anything malformed or absent -> 'missing'."""
    found = AGE.fullmatch(age.strip())
    if not found:
        return MISSING
    years = int(found.group(1)) * DAYS_PER[found.group(2)] / 365.25
    return next(name for limit, name in AGE_BANDS if years < limit)


def attributes(headers: Sequence[dict[str, str]]) -> pd.DataFrame:
    """One row per study: the four grouping attributes from its header fields."""
    return pd.DataFrame({
        "PatientSex": [h.get("PatientSex", "") if h.get("PatientSex", "") in ("F", "M", "O")
                       else MISSING for h in headers],
        "age_band": [age_band(h.get("PatientAge", "")) for h in headers],
        "ViewPosition": [h.get("ViewPosition", "") if h.get("ViewPosition", "") in ("AP", "PA")
                         else "other/missing" for h in headers],
        "Manufacturer": [h.get("Manufacturer", "").strip() or MISSING for h in headers],
    })


def subgroup_table(labels: np.ndarray, probabilities: np.ndarray,
                   class_names: Sequence[str], groups: pd.DataFrame, *,
                   threshold: float | None = None, resamples: int = 1000,
                   seed: int = 0) -> pd.DataFrame:
    """COLUMNS (+ EXTRA_COLUMNS) for every value of every attribute in `groups` (same rows
    as `labels`). Prevalence is the share of studies not negative; the bootstrap is the one
    the overall numbers use, within the subgroup, with the same seed."""
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    overall = metrics.roc_auc(labels, probabilities)
    rows, p_values = [], {}
    for attribute in groups.columns:
        for value, members in groups.groupby(attribute, sort=True).groups.items():
            index = groups.index.get_indexer(members)
            sub_labels, sub_probabilities = labels[index], probabilities[index]
            row = {"attribute": attribute, "value": value, "n": len(index)}
            if len(index) >= MIN_STUDIES and len(np.unique(sub_labels)) >= 2:
                scored, aucs = _scored(sub_labels, sub_probabilities, class_names, threshold,
                                       resamples, seed)
                row |= scored
                p_values[len(rows)] = below_p_value(aucs, overall)
            rows.append(row)
    for position, adjusted in zip(p_values, holm(list(p_values.values())), strict=True):
        rows[position] |= {"auc_below_p_holm": adjusted,
                           "auc_below_overall": bool(adjusted < FAMILY_ALPHA)}
    return pd.DataFrame(rows).reindex(columns=COLUMNS + EXTRA_COLUMNS)


def below_p_value(aucs: np.ndarray, overall: float) -> float:
    """One-sided bootstrap p-value of "this group's AUC is not below `overall`": the share
    of its resamples (NaN ones left out) whose AUC reaches it, counting the observed one."""
    drawn = aucs[~np.isnan(aucs)]
    return float((1 + np.sum(drawn >= overall)) / (1 + len(drawn)))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the given order: the i-th smallest times
    (m - i + 1), never below the one before it, at most 1."""
    order = np.argsort(p_values, kind="stable")
    adjusted, running = np.empty(len(p_values)), 0.0
    for rank, position in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[position]))
        adjusted[position] = running
    return adjusted.tolist()


def _scored(labels: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str],
            threshold: float | None, resamples: int, seed: int
            ) -> tuple[dict[str, float], np.ndarray]:
    """A group's row (point values and intervals) and its resamples' AUCs."""
    point = metrics.batched(labels[None], probabilities[None], class_names, threshold)
    samples = bootstrap_samples(labels, probabilities, class_names, resamples, seed, threshold)
    intervals = confidence_intervals(labels, probabilities, class_names, samples=samples)
    row = {"prevalence": float((labels > 0).mean())}
    for name in ("roc_auc", "sensitivity", "specificity"):
        if name in point:
            row[name] = float(point[name][0])
            row[f"{name}_ci_low"], row[f"{name}_ci_high"] = intervals.get(name,
                                                                          (np.nan, np.nan))
    return row, samples["roc_auc"]


def forest_figure(table: pd.DataFrame, overall_auc: float, title: str = "test") -> Figure:
    """AUC with its 95% interval per subgroup (one line each, grouped by attribute), the
    overall AUC as a vertical line; flagged groups in red, small ones listed with n only."""
    figure, axis = plt.subplots(figsize=(7, 0.32 * len(table) + 1.5))
    labels = []
    for position, row in enumerate(table.itertuples(index=False)):
        y = len(table) - 1 - position
        labels.append(f"{row.attribute}: {row.value} (n={row.n})")
        if pd.isna(row.roc_auc):
            axis.text(0.02, y, f"< {MIN_STUDIES} studies or one class: not scored",
                      va="center", fontsize=8, color="grey", transform=axis.get_yaxis_transform())
            continue
        colour = "tab:red" if row.auc_below_overall else "tab:blue"
        axis.errorbar(row.roc_auc, y, xerr=[[row.roc_auc - row.roc_auc_ci_low],
                                            [row.roc_auc_ci_high - row.roc_auc]],
                      fmt="o", color=colour, capsize=3)
    axis.axvline(overall_auc, color="black", linestyle="--", linewidth=0.8,
                 label=f"overall AUC {overall_auc:.3f}")
    axis.set_yticks(range(len(table))[::-1], labels, fontsize=8)
    axis.set(xlabel="AUC (95% bootstrap CI)", xlim=(0, 1.02), ylim=(-0.7, len(table) - 0.3),
             title=f"{title} AUC by subgroup (red: below overall, Holm-adjusted p < "
                   f"{FAMILY_ALPHA:g})")
    axis.legend(loc="lower left", fontsize=8)
    figure.tight_layout()
    return figure


def add_subgroups(evaluation: Evaluation, labels: np.ndarray, probabilities: np.ndarray,
                  class_names: Sequence[str], headers: Sequence[dict[str, str]], *,
                  threshold: float | None, resamples: int, seed: int, title: str) -> None:
    """Put the subgroup table and its forest plot into `evaluation` (logged with it as
    subgroups.csv and figures/subgroups.png)."""
    table = subgroup_table(labels, probabilities, class_names, attributes(headers),
                           threshold=threshold, resamples=resamples, seed=seed)
    evaluation.tables["subgroups"] = table
    evaluation.figures["subgroups"] = forest_figure(table, evaluation.metrics["roc_auc"], title)
