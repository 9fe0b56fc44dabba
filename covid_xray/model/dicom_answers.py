"""The answers of one batch as DICOM objects: for each scored film its Grad-CAM Secondary
Capture, for each study its Structured Report (model/dicom_results.py writes them). Served,
they come back as base64 columns of the answer table; `-e predict -P dicom_out` writes them
into a folder with the same steps.

A study's objects come whole or not at all: a study whose report cannot be written keeps no
heatmap object either, and its films are flagged `no_dicom_result`. A study whose films name
two patients (`patient_mismatch`) gets none.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import pandas as pd

from covid_xray.evaluation.gradcam import grad_cam, overlay
from covid_xray.imaging.workers import Decoded
from covid_xray.model.answers import add_flag, has_flag
from covid_xray.model.dicom_results import StudyResults, read_source, to_bytes
from covid_xray.model.requests import open_row


def heatmap_picture(classifier: Any, file: Any, item: Decoded, label: str) -> np.ndarray:
    """The film (a path or an open file) at its own size, BGR, with the Grad-CAM of
    `label` over the square the model saw."""
    heatmap = grad_cam(classifier.model.network, item.model_input,
                       classifier.class_names.index(label))
    if hasattr(file, "seek"):
        file.seek(0)
    return overlay(file, heatmap, classifier.preprocessing)


def film_result(classifier: Any, results: StudyResults, file: Any, item: Decoded,
                probabilities: np.ndarray, label: str) -> tuple[Any, np.ndarray]:
    """For a scored film: its header goes to `results` (for its study's report); returns
    its Grad-CAM Secondary Capture and the overlay picture."""
    source = read_source(file)
    picture = heatmap_picture(classifier, file, item, label)
    image = results.heatmap(source, picture)
    results.add(source, probabilities, label)  # only once all of it worked
    return image, picture


def attach_dicom_results(classifier: Any, result: pd.DataFrame, column: str,
                         values: pd.Series, decoded: list[Decoded], root: str) -> None:
    """`sr_base64` (the report of the row's study: the same bytes on every row of one
    study) and `heatmap_base64` (the film's Grad-CAM Secondary Capture) as DICOM files in
    base64; empty for a row that was not scored. A film whose header defeats the writer
    keeps its answer and gets the flag `no_dicom_result`."""
    results = StudyResults(classifier.class_names, classifier.threshold, classifier.identity)
    probabilities = result[[f"prob_{name}" for name in classifier.class_names]].to_numpy()
    heatmaps, studies = [""] * len(result), [""] * len(result)
    for row, (value, item, label) in enumerate(zip(values, decoded, result.label,
                                                   strict=True)):
        if not label or has_flag(result["flags"][row], "patient_mismatch"):
            continue  # refused, or its study names two patients: no DICOM result
        try:
            image, _ = film_result(classifier, results, open_row(column, value, row, root),
                                   item, probabilities[row], label)
            heatmaps[row] = base64.b64encode(to_bytes(image)).decode("ascii")
            studies[row] = image.StudyInstanceUID
        except Exception:
            result.loc[row, "flags"] = add_flag(result["flags"][row], "no_dicom_result")
    made, failed = results.reports()
    reports = {study: base64.b64encode(to_bytes(report)).decode("ascii")
               for study, report in made.items()}
    for row, study in enumerate(studies):
        if study in failed:  # all or none: no heatmap object without its study's report
            result.loc[row, "flags"] = add_flag(result["flags"][row], "no_dicom_result")
            heatmaps[row] = ""
    result["sr_base64"] = [reports.get(study, "") for study in studies]
    result["heatmap_base64"] = heatmaps
