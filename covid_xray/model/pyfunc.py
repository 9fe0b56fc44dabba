"""The registered model as MLflow sees it: DICOMs in, per-class probabilities out.

`mlflow.pyfunc.load_model("models:/covid-xray-densenet/Production").predict(frame)` takes a
DataFrame with a `dicom_base64` column (the file's bytes, base64: what REST clients send to
`mlflow models serve`), or `path` where the operator allows it (model/requests.py). It returns
one row per input (model/answers.py): calibrated `prob_<class>`, `label` at the model's stored
threshold, and `error`: a file that cannot be read becomes a row with its error, not a failed
request. Any failure of one row is that row's `error`, never an exception: a server never
sends a client a stack trace. Served, failed rows carry null probabilities (JSON has no NaN),
and a request without any DICOM is an HTTP 400 that says so. `{"params": {"dicom_results":
true}}` adds the answers as DICOM objects (model/dicom_answers.py).

Logged as code, not as a pickle (MLflow's models-from-code): `served_model.py` is the model's
code, and its state is artifacts (model/artifacts.py). The torch module stays reachable:
`mlflow.pyfunc.load_model(uri).unwrap_python_model().model`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from covid_xray.evaluation.calibration import OperatingPoint
from covid_xray.evaluation.outliers import FeatureDistance
from covid_xray.imaging.preprocess import Preprocessing
from covid_xray.imaging.workers import Decoded, decode, decoded_batches
from covid_xray.model import artifacts
from covid_xray.model.answers import TEXT_COLUMNS, answer_frame, model_failed, nulls_for_json
from covid_xray.model.dicom_answers import attach_dicom_results
from covid_xray.model.dicom_results import ModelIdentity, StudyResults
from covid_xray.model.networks import Classifier, resolve_device
from covid_xray.model.requests import INPUT_COLUMNS, input_column, open_row, served

# The device a loaded model answers on: auto (CUDA when visible), cpu or cuda.
DEVICE_VARIABLE = "COVID_XRAY_DEVICE"
logger = logging.getLogger(__name__)


class DicomClassifier(mlflow.pyfunc.PythonModel):
    """A trained `Classifier` plus the preprocessing it was trained with.

    Made whole in process (training), or empty by `served_model.py` and filled from the
    logged artifacts by `load_context` (loading)."""

    def __init__(self, model: Classifier | None = None,
                 preprocessing: Preprocessing | None = None, batch_size: int = 16,
                 architecture: str = "none", operating: OperatingPoint | None = None):
        # channels_last (NHWC): oneDNN's CPU convolutions run a DenseNet121 ~1.4x faster so.
        self.model = (model.eval().to(memory_format=torch.channels_last) if model is not None
                      else None)
        self.preprocessing = preprocessing
        self.batch_size = batch_size
        self.architecture = architecture  # a `config.MODEL_FAMILIES` name
        self.device = torch.device("cpu")
        self.outliers: FeatureDistance | None = None  # fitted after training (outliers.npz)
        self.identity = ModelIdentity()  # named in DICOM results; set by whoever loads it
        self.set_operating_point(operating or OperatingPoint())

    def to_device(self, name: str) -> DicomClassifier:
        """Answer on `name` (auto, cpu, cuda) from now on. On CUDA the forward runs in bf16
        autocast where the GPU has it (Ampere and later), float16 before; decoding stays in
        the CPU workers either way."""
        self.device = resolve_device(name)
        self.model.to(self.device)
        return self

    def set_operating_point(self, operating: OperatingPoint) -> None:
        """Answer with this temperature and call classes at this threshold from now on."""
        self.operating = operating
        if self.model is not None:
            self.model.temperature = operating.temperature

    @property
    def threshold(self) -> float | None:
        return self.operating.threshold

    def load_context(self, context: Any) -> None:
        """Rebuild the model from its artifacts (a model pickled whole has none: as is)."""
        if "weights" not in context.artifacts:
            return
        parts = artifacts.load(context.artifacts)
        self.__init__(parts.model, parts.preprocessing, parts.batch_size, parts.architecture,
                      parts.operating)
        self.outliers, self.identity = parts.outliers, parts.identity
        # Served (or loaded anywhere): the operator picks the device; CUDA when present.
        self.to_device(os.environ.get(DEVICE_VARIABLE, "auto"))

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.model.class_names

    def predict(self, context: Any, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        frame = pd.DataFrame(model_input)
        column, root = input_column(frame)  # else BadInput: a 400 saying what a request needs
        dicom_results = bool((params or {}).get("dicom_results"))
        try:
            result = self.answer_request(frame[column], column, root, dicom_results)
        except Exception as error:  # a defect of ours: logged here, each row says so
            logger.exception("this request could not be answered")
            decoded = [Decoded(None) for _ in range(len(frame))]
            model_failed(decoded, error)
            result = self.result_frame(None, decoded=decoded)
            if dicom_results:
                result["sr_base64"] = result["heatmap_base64"] = ""
        if served():  # strict JSON; in process failed rows stay NaN, pandas' missing value
            nulls_for_json(result, [*(f"prob_{name}" for name in self.class_names),
                                    "ood_score"])
        return result

    def answer_request(self, values: pd.Series, column: str, root: str, dicom_results: bool,
                       results: StudyResults | None = None) -> pd.DataFrame:
        """The answer table of one request's column of files (and their DICOM results, made
        in `results` when given: another scope, a predecessor)."""
        decoded = [decode(self.preprocessing, open_row(column, value, row, root))
                   for row, value in enumerate(values)]
        try:
            probabilities, distances = self.answers(decoded)
        except Exception as error:  # the network itself failed (out of memory, say)
            probabilities = distances = None
            model_failed(decoded, error)
        result = self.result_frame(probabilities, distances, decoded)
        if dicom_results:
            attach_dicom_results(self, result, column, values, decoded, root, results)
        return result

    def answer_files(self, paths: Sequence[str], batch_size: int, num_workers: int
                     ) -> Iterator[tuple[list[Decoded], pd.DataFrame]]:
        """(decoded files, answers) for consecutive `batch_size` slices of DICOM `paths`,
        decoded in worker processes: the one batch loop of predict and evaluate."""
        for decoded in decoded_batches(paths, self.preprocessing, batch_size, num_workers):
            yield decoded, self.result_frame(*self.answers(decoded), decoded=decoded)

    def answers(self, decoded: list[Decoded]) -> tuple[np.ndarray, np.ndarray]:
        """Batched forward over the files that decoded: probabilities and each film's
        distance to the training films (NaN rows for those that did not decode; NaN distances
        when the model has no fitted distance)."""
        output = np.full((len(decoded), len(self.class_names)), np.nan, dtype=np.float32)
        distances = np.full(len(decoded), np.nan)
        rows = [index for index, item in enumerate(decoded) if item.model_input is not None]
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            batch = torch.from_numpy(np.stack([decoded[i].model_input for i in chunk]))
            output[chunk], features = self.forward_with_features(batch)
            if self.outliers is not None:
                distances[chunk] = self.outliers.scores(features)
        return output, distances

    def probabilities(self, decoded: list[Decoded]) -> np.ndarray:
        return self.answers(decoded)[0]

    def forward(self, batch: torch.Tensor) -> np.ndarray:
        """Class probabilities of a batch of model inputs: the one forward every prediction of
        this model runs (training's test split included)."""
        return self.forward_with_features(batch)[0]

    @torch.no_grad()
    def forward_with_features(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """`forward`, and the penultimate features the distance to training is measured on."""
        batch = batch.to(self.device, non_blocking=True).contiguous(
            memory_format=torch.channels_last)
        if self.device.type != "cuda":
            probabilities, features = self.model.answer(batch)
        else:
            half = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            with torch.autocast("cuda", dtype=half):
                probabilities, features = self.model.answer(batch)
        return probabilities.float().cpu().numpy(), features.float().cpu().numpy()

    def result_frame(self, probabilities: np.ndarray | None,
                     distances: np.ndarray | None = None,
                     decoded: list[Decoded] | None = None) -> pd.DataFrame:
        """The answer table of these files (model/answers.py), with this model's classes,
        threshold and out-of-distribution limit. No probabilities: none was scored."""
        if probabilities is None:
            probabilities = np.full((len(decoded), len(self.class_names)), np.nan)
        if distances is None:
            distances = np.full(len(decoded), np.nan)
        limit = self.outliers.threshold if self.outliers is not None else np.inf
        return answer_frame(probabilities, distances, decoded, self.class_names,
                            self.threshold, limit)


def signature(class_names: tuple[str, ...]) -> ModelSignature:
    """Either input column may be given; outputs are per-class probabilities, label, error,
    the refusal's reason code, the gate's flags and the film's UIDs."""
    inputs = Schema([ColSpec("string", name, required=False) for name in INPUT_COLUMNS])
    outputs = Schema([*(ColSpec("double", f"prob_{name}") for name in class_names),
                      *(ColSpec("string", name) for name in TEXT_COLUMNS),
                      ColSpec("double", "ood_score"), ColSpec("boolean", "in_distribution")])
    # Ask for the DICOM results with {"params": {"dicom_results": true}}.
    params = ParamSchema([ParamSpec("dicom_results", "boolean", False)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)
