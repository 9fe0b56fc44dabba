"""The answer table: one row per input film, whatever became of it.

Columns: `prob_<class>` (calibrated), `label` (binary: `opacity` when P(opacity) reaches the
model's threshold; 4-class: the most probable class), `error` and `reason` (why a film was not
scored: a gate's or reader's reason code, `model_error`, or `out_of_distribution`), `flags`
(space-separated notes that do not refuse: the gate's, `patient_mismatch`, `no_heatmap`,
`no_dicom_result`), the film's UIDs, `ood_score` and `in_distribution`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from covid_xray.evaluation.calibration import predicted_classes
from covid_xray.imaging.dicom import PATIENT_KEY, UID_FIELDS
from covid_xray.imaging.workers import Decoded

# What every answer row carries besides prob_<class>, in this order.
TEXT_COLUMNS = ("label", "error", "reason", "flags", *UID_FIELDS)


def answer_frame(probabilities: np.ndarray, distances: np.ndarray, decoded: list[Decoded],
                 class_names: Sequence[str], threshold: float | None,
                 ood_limit: float) -> pd.DataFrame:
    """One row per file: prob_<class>, then TEXT_COLUMNS, ood_score and in_distribution. A
    refused or unreadable file has its error and reason code, and no label or probabilities;
    a film far from the training films (distance over `ood_limit`) keeps its probabilities
    for audit but gets no label, and the reason out_of_distribution."""
    frame = pd.DataFrame(probabilities.astype(np.float64),
                         columns=[f"prob_{name}" for name in class_names])
    called = predicted_classes(np.nan_to_num(probabilities, nan=-1), threshold)
    labels = [class_names[index] for index in called]
    outside = [not item.error and distance > ood_limit
               for item, distance in zip(decoded, distances, strict=True)]
    frame["label"] = _text(label if not item.error and not far else "" for label, item, far
                           in zip(labels, decoded, outside, strict=True))
    frame["error"] = _text(item.error for item in decoded)
    frame["reason"] = _text("out_of_distribution" if far else item.reason
                            for item, far in zip(decoded, outside, strict=True))
    frame["flags"] = _text(" ".join(item.flags) for item in decoded)
    for key in UID_FIELDS:
        frame[key] = _text(item.uids.get(key, "") for item in decoded)
    mixed = mixed_patient_studies(frame.study_instance_uid,
                                  [item.uids.get(PATIENT_KEY, "") for item in decoded])
    flag_rows(frame, frame.study_instance_uid.isin(list(mixed)), "patient_mismatch")
    frame["ood_score"] = distances.astype(np.float64)
    # Unknown (None) for a file that was not scored, or a model without a distance.
    frame["in_distribution"] = pd.Series(
        [None if item.error or np.isnan(distance) else not far
         for item, distance, far in zip(decoded, distances, outside, strict=True)],
        dtype=object)
    return frame


def _text(values: Iterable[str]) -> pd.Series:
    """A text column, typed as text even with no rows: pandas infers an empty list as
    float, and a table of no rows must still take `.str` like any other."""
    return pd.Series(list(values), dtype=str)


def model_failed(decoded: list[Decoded], error: Exception) -> None:
    """The network itself failed on a batch (out of memory, say): every film that decoded
    gets that as its error, by the error's type (its text may hold server paths)."""
    for row, item in enumerate(decoded):
        if not item.error:
            item.error = f"row {row}: the model could not score this input ({type(error).__name__})"
            item.reason = "model_error"


def nulls_for_json(frame: pd.DataFrame, columns: Sequence[str]) -> None:
    """NaN as None in `columns`: JSON has no NaN (browsers' JSON.parse rejects the whole
    reply), so a served failed row carries null probabilities."""
    for name in columns:
        frame[name] = frame[name].astype(object).where(frame[name].notna(), None)


def add_flag(flags: str, flag: str) -> str:
    """A row's space-separated `flags` with `flag` added (once)."""
    return flags if has_flag(flags, flag) else " ".join(filter(None, (flags, flag)))


def has_flag(flags: str, flag: str) -> bool:
    """Whether a row's space-separated `flags` hold `flag`."""
    return flag in flags.split()


def flag_rows(frame: pd.DataFrame, rows: pd.Series, flag: str) -> None:
    """Add `flag` to the `flags` of the rows `rows` (a boolean mask) selects."""
    frame.loc[rows, "flags"] = frame["flags"][rows].map(lambda flags: add_flag(flags, flag))


def mixed_patient_studies(study_uids: Sequence[str], patients: Sequence[str]) -> set[str]:
    """The StudyInstanceUIDs whose films name more than one patient (dicom.PATIENT_KEY
    digests): such a study gets no study answer and no report, since a mean or a report over
    two patients' films would be a plausible answer about the wrong person. Films without a
    StudyInstanceUID are studies of their own."""
    seen: dict[str, set[str]] = {}
    for study, patient in zip(study_uids, patients, strict=True):
        if study:
            seen.setdefault(study, set()).add(patient)
    return {study for study, names in seen.items() if len(names) > 1}
