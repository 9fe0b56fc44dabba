"""One study, scored: its spooled films through the registered model's own request path
(`DicomClassifier.answer_request`, what a served model and `-e predict` run), and its
results (the report and a heatmap per scored film) written to `state_dir/results/<study>/`.
"""

from __future__ import annotations

import base64
import io
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pydicom

from covid_xray.files import atomic_write
from covid_xray.model.dicom_answers import study_results
from covid_xray.pacs.spool import file_key


class ModelFailed(Exception):
    """The network failed on the study's films (out of memory, a corrupt weight): nothing of
    the study was scored, and it is scored again later, its films kept."""


@dataclass
class Scored:
    """What scoring one study made: its results' SOP Instance UIDs (their files are
    `<uid>.dcm` in the study's folder), the report's [series, SOP] UIDs (a study none of
    whose films could be scored gets a report that says why, film by film; [] only when no
    film's header could be read), and the films' reason codes (refused, out of
    distribution)."""

    uids: list[str] = field(default_factory=list)
    report: list[str] = field(default_factory=list)
    scored: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


def score_study(model: Any, study: str, films: list[Path], spool: Path, results: Path,
                scope: str, predecessor: list[str], refused: dict[str, int]) -> Scored:
    """Score `films` (spool files) of `study`; write its results into `results/<study>/`
    (what was there before is replaced: it belonged to an earlier scoring). `refused`: its
    films the node could not keep, by reason, which the report counts. Raises ModelFailed,
    writing nothing, when the network failed on them."""
    made = study_results(model, scope, {study: tuple(predecessor)} if predecessor else None,
                         every_study=True, refused_on_arrival={study: refused})
    answers = model.answer_request(pd.Series([str(path) for path in films]), "path",
                                   str(spool), True, made)
    failed = answers.error[answers.reason == "model_error"]
    if len(failed):  # "row N: the model could not score this input (OutOfMemoryError)"
        raise ModelFailed(failed.iloc[0].rpartition("(")[2].rstrip(")"))
    folder = results / file_key(study)
    shutil.rmtree(folder, ignore_errors=True)
    outcome = Scored(scored=int((answers.label != "").sum()),
                     reasons={str(reason): int(count) for reason, count
                              in answers.reason[answers.reason != ""].value_counts().items()})
    encoded = [*dict.fromkeys(answers.sr_base64[answers.sr_base64 != ""]),
               *answers.heatmap_base64[answers.heatmap_base64 != ""]]
    for text in encoded:
        data = base64.b64decode(text)
        header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        path = folder / f"{header.SOPInstanceUID}.dcm"
        atomic_write(path, lambda file, data=data: file.write(data))
        outcome.uids.append(str(header.SOPInstanceUID))
        if header.Modality == "SR":
            outcome.report = [str(header.SeriesInstanceUID), str(header.SOPInstanceUID)]
    return outcome
