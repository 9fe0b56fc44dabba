"""What a caller sends the model: a DataFrame with DICOM bytes in base64 (`dicom_base64`), or
paths (`path`) when the operator allows them; and how to make such a request.

It reads `dicom_base64` only, in every host (a REST server, a notebook, Spark, a custom
server): a `path` would let whoever sends the input open any file the host can read, and an
error saying "file not found" would tell them which exist. The operator opts in to paths by
naming the one folder they may point into in COVID_XRAY_PATH_ROOT; a path outside it is refused
with the same words whether or not it exists. A row that cannot be opened is that row's error
(a `DicomError` returned, not raised), never a failed request.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from covid_xray.errors import DicomError, UserError
from covid_xray.imaging.writer import write_dicom

INPUT_COLUMNS = ("path", "dicom_base64")
# `path` is accepted only when the operator names a folder here (paths inside it only).
PATH_ROOT_VARIABLE = "COVID_XRAY_PATH_ROOT"


class BadInput(UserError, MlflowException):
    """A request the model cannot answer at all: a one-line error in process, an HTTP 400
    whose message says what is wrong when served."""

    def __init__(self, message: str):
        MlflowException.__init__(self, message, error_code=INVALID_PARAMETER_VALUE)


def input_column(frame: pd.DataFrame) -> tuple[str, str]:
    """(the column holding the DICOMs, the folder paths may point into: "" when none), or
    BadInput saying what a request needs."""
    root = os.environ.get(PATH_ROOT_VARIABLE, "")
    allowed = INPUT_COLUMNS if root else ("dicom_base64",)
    column = next((name for name in INPUT_COLUMNS if name in frame.columns
                   and frame[name].notna().any()), None)
    if column not in allowed:
        # (Served, MLflow has already dropped columns outside the signature: a request with
        # only other columns arrives as no rows at all.)
        found = f"columns {list(frame.columns)}" if len(frame.index) else "no rows"
        hint = (f"; paths are read only under a folder the operator names in "
                f"{PATH_ROOT_VARIABLE}" if column == "path" else "")
        raise BadInput(f"input needs a column named {' or '.join(allowed)} with at least "
                       f"one DICOM, got {found}{hint}")
    return column, root


def open_row(column: str, value: Any, row: int, root: str):
    """A path under `root`, or an in-memory file named after its row so errors say which
    input failed; a DicomError (returned, not raised: one bad row is that row's error)."""
    if column == "path":
        try:
            folder = Path(root).resolve()
            path = (folder / str(value)).resolve()  # an absolute value stays absolute
        except (ValueError, OSError, RuntimeError):  # a NUL byte; a symlink loop (3.11)
            path = None
        if path is None or not path.is_relative_to(folder):
            # Decided on the name alone: the same words whether or not such a file exists.
            return DicomError(f"row {row}: path is outside the folder this model reads")
        return RowPath(path, row)
    try:
        file = io.BytesIO(base64.b64decode(str(value), validate=True))
    except (binascii.Error, ValueError):
        return DicomError(f"row {row}: dicom_base64 is not valid base64")
    file.name = f"row {row}"
    return file


class RowPath:
    """A path under the operator's folder that errors name by its row, as they name base64
    rows, never by the server's absolute path (os.PathLike: pydicom opens it)."""

    def __init__(self, path: Path, row: int):
        self.path, self.row = path, row

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return f"row {self.row}"


def served() -> bool:
    """Whether this process is `mlflow models serve` (MLflow sets this flag in its scoring
    server, and while validating a model's example request as the server would)."""
    return os.environ.get("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "").lower() == "true"


def encode_dicom(path: str) -> str:
    """A DICOM file as the base64 text the `dicom_base64` column expects."""
    with open(path, "rb") as file:
        return base64.b64encode(file.read()).decode("ascii")


def example_input() -> pd.DataFrame:
    """A one-row input holding a small made-up film (64 px: a bright body, two dark lung
    fields): the documented request shape, light enough to store with every model. Drawn
    here rather than by the demo-data generator, which a deployment need not carry."""
    rows, cols = np.mgrid[0:64, 0:64] / 63.0
    film = 0.7 - 0.3 * ((cols - 0.5) ** 2 + (rows - 0.5) ** 2)
    for centre in (0.3, 0.7):  # the lungs: ellipses darker than the mediastinum between them
        film -= 0.4 * (((cols - centre) / 0.15) ** 2 + ((rows - 0.5) / 0.3) ** 2 < 1)
    with tempfile.TemporaryDirectory() as folder:
        path = f"{folder}/example.dcm"
        write_dicom(path, np.round(np.clip(film, 0, 1) * 4095))
        return pd.DataFrame({"dicom_base64": [encode_dicom(path)]})
