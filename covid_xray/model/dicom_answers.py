"""The answers of one batch as DICOM objects: for each scored film its Grad-CAM Secondary
Capture, for each study its Structured Report (model/dicom_results.py writes them). Served,
they come back as base64 columns of the answer table; `-e predict -P dicom_out` writes them
into a folder with the same steps.

A study's report covers exactly the films its answer averages: every scored film, whether or
not its heatmap could be drawn (one that could not is flagged `no_heatmap`). A study's objects
come whole or not at all: a study whose report cannot be written (or one of whose films'
headers cannot be read) keeps no heatmap object either, and its films are flagged
`no_dicom_result`. A study whose films name two patients (`patient_mismatch`) gets none.
"""

from __future__ import annotations

import base64
import logging
from typing import Any

import numpy as np
import pandas as pd
from pydicom.dataset import Dataset

from covid_xray.evaluation.gradcam import grad_cam, overlay
from covid_xray.imaging.workers import Decoded
from covid_xray.model.answers import add_flag, flag_rows, has_flag
from covid_xray.model.dicom_results import (
    FilmCounts,
    ReportedModel,
    StudyResults,
    as_uid,
    pixel_digest,
    read_source,
    to_bytes,
)
from covid_xray.model.requests import open_row

logger = logging.getLogger(__name__)


def study_results(classifier: Any, scope: str,
                  predecessors: dict[str, tuple[str, str]] | None = None,
                  every_study: bool = False,
                  refused_on_arrival: dict[str, dict[str, int]] | None = None) -> StudyResults:
    """An empty collection of a batch's results for this `DicomClassifier`'s answers."""
    return StudyResults(ReportedModel(classifier.class_names, classifier.threshold,
                                      classifier.operating.training_prevalence,
                                      classifier.identity), scope, predecessors, every_study,
                        refused_on_arrival)


def heatmap_picture(classifier: Any, file: Any, item: Decoded, label: str) -> np.ndarray:
    """The film (a path or an open file) at its own size, BGR, with the Grad-CAM of
    `label` over the square the model saw."""
    heatmap = grad_cam(classifier.model.network, item.model_input,
                       classifier.class_names.index(label))
    if hasattr(file, "seek"):
        file.seek(0)
    return overlay(file, heatmap, classifier.preprocessing)


def add_film(results: StudyResults, file: Any, item: Decoded, probabilities: np.ndarray,
             label: str) -> Dataset | None:
    """A scored film into its study's report; returns its header (`read_source`), or None
    when the header cannot be read: the study then gets no report, since it would leave the
    film out of a mean that counts it."""
    try:
        source, pixels = read_source(file), pixel_digest(file)
    except Exception:
        if item.uids.get("study_instance_uid"):
            results.withhold(as_uid(item.uids["study_instance_uid"]),
                             "a film's header could not be read")
        return None
    results.add(source, probabilities, label, pixels)
    return source


def decline_film(results: StudyResults, file: Any, reason: str) -> str:
    """A film that was not scored into its study's report (`StudyResults.every_study`), with
    its reason code; its study's UID, or "" when even its header cannot be read (then it is
    only counted)."""
    try:
        source = read_source(file)
    except Exception:
        return ""
    results.decline(source, reason)
    return source.StudyInstanceUID


def left_out(answers: pd.DataFrame) -> dict[str, FilmCounts]:
    """By study (its UID as the results file it: `as_uid`), the films of the answer table
    that are not in the study's answer: out of distribution, or refused by reason code."""
    counts: dict[str, FilmCounts] = {}
    unscored = answers[(answers.reason != "") & (answers.study_instance_uid != "")]
    for study, films in unscored.groupby("study_instance_uid"):
        reasons = films.reason.value_counts().to_dict()
        outside = reasons.pop("out_of_distribution", 0)
        counts[as_uid(study)] = FilmCounts(out_of_distribution=int(outside),
                                           refused={str(reason): int(number)
                                                    for reason, number in reasons.items()})
    return counts


def attach_dicom_results(classifier: Any, result: pd.DataFrame, column: str,
                         values: pd.Series, decoded: list[Decoded], root: str,
                         results: StudyResults | None = None) -> None:
    """`sr_base64` (the report of the row's study: the same bytes on every row of one
    study; it covers this request's films only) and `heatmap_base64` (the film's Grad-CAM
    Secondary Capture) as DICOM files in base64; empty for a row that was not scored.

    Whatever fails here costs the request its DICOM objects, never its answers: the scored
    rows are flagged `no_dicom_result`, the server's log has the traceback, the client none.
    `results`: where the objects are made (default: a request's, `study_results`)."""
    try:
        _attach(classifier, result, column, values, decoded, root,
                results or study_results(classifier, "request"))
    except Exception:
        logger.exception("no DICOM results for this request")
        result["sr_base64"] = result["heatmap_base64"] = ""
        flag_rows(result, result.label != "", "no_dicom_result")


def _attach(classifier: Any, result: pd.DataFrame, column: str, values: pd.Series,
            decoded: list[Decoded], root: str, results: StudyResults) -> None:
    probabilities = result[[f"prob_{name}" for name in classifier.class_names]].to_numpy()
    heatmaps, studies = [""] * len(result), [""] * len(result)
    for row, (value, item, label) in enumerate(zip(values, decoded, result.label,
                                                   strict=True)):
        mismatch = has_flag(result["flags"][row], "patient_mismatch")
        if not label or mismatch:  # refused, or its study names two patients: no result
            if results.every_study:  # ... but its study's report names it, and why
                studies[row] = decline_film(results, open_row(column, value, row, root),
                                            "patient_mismatch" if mismatch
                                            else result.reason[row])
            continue
        file = open_row(column, value, row, root)
        source = add_film(results, file, item, probabilities[row], label)
        if source is None:
            result.loc[row, "flags"] = add_flag(result["flags"][row], "no_dicom_result")
            continue
        studies[row] = source.StudyInstanceUID
        try:
            image = results.heatmap(source, heatmap_picture(classifier, file, item, label),
                                    label)
            heatmaps[row] = base64.b64encode(to_bytes(image)).decode("ascii")
        except Exception:
            result.loc[row, "flags"] = add_flag(result["flags"][row], "no_heatmap")
    made, failed = results.reports(left_out(result))
    reports = {study: base64.b64encode(to_bytes(report)).decode("ascii")
               for study, report in made.items()}
    for row, study in enumerate(studies):
        if study in failed:  # all or none: no heatmap object without its study's report
            result.loc[row, "flags"] = add_flag(result["flags"][row], "no_dicom_result")
            heatmaps[row] = ""
    result["sr_base64"] = [reports.get(study, "") for study in studies]
    result["heatmap_base64"] = heatmaps
