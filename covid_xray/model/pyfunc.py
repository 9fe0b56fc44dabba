"""The registered model as MLflow sees it: DICOMs in, per-class probabilities out.

`mlflow.pyfunc.load_model("models:/covid-xray-densenet/Production").predict(frame)` takes a
DataFrame with a `path` column (DICOM files on disk) or a `dicom_base64` column (the file's
bytes, base64: what REST clients send to `mlflow models serve`). It returns one row per input
with `prob_<class>` columns (calibrated: temperature scaling fitted on validation), `label`
(binary: `opacity` when P(opacity) reaches the model's stored threshold; 4-class: the most
probable class) and `error` (empty when fine): a file that cannot be read becomes a row with
its error, not a failed request.

It reads `dicom_base64` only, in every host (a REST server, a notebook, Spark, a custom
server): a `path` would let whoever sends the input open any file the host can read, and an
error saying "file not found" would tell them which exist. The operator opts in to paths by
naming the one folder they may point into in COVID_XRAY_PATH_ROOT; a path outside it is refused
with the same words whether or not it exists. Any failure of one row (a malformed header, a
NUL byte in a path, anything) is that row's `error`, never an exception: a server never sends
a client a stack trace. Served, failed rows carry null probabilities (JSON has no NaN), and a
request without any DICOM is an HTTP 400 that says so.

Logged as code, not as a pickle (MLflow's models-from-code): `served_model.py` is the model's
code, and two artifacts hold its state: `weights.pt` (the network's state_dict, read with
`weights_only=True`) and `model.json` (architecture, classes, TTA, the
`preprocess.Preprocessing` training used, so predictions see images exactly as training did,
and the operating point: temperature, threshold, the rule that chose it, training prevalence).
Nothing is unpickled. The torch module stays reachable:
`mlflow.pyfunc.load_model(uri).unwrap_python_model().model`.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from covid_xray.errors import DicomError, UserError
from covid_xray.evaluation.calibration import ARGMAX, OperatingPoint, predicted_classes
from covid_xray.evaluation.gradcam import grad_cam, overlay
from covid_xray.evaluation.outliers import FeatureDistance
from covid_xray.imaging.dicom import PATIENT_KEY, UID_FIELDS
from covid_xray.imaging.preprocess import Preprocessing
from covid_xray.imaging.workers import Decoded, decode, decoded_batches
from covid_xray.imaging.writer import write_dicom
from covid_xray.model.dicom_results import ModelIdentity, StudyResults, read_source, to_bytes
from covid_xray.model.networks import Classifier, architecture, resolve_device

INPUT_COLUMNS = ("path", "dicom_base64")
OUTLIERS_ARTIFACT = "outliers.npz"  # the fitted distance to the training films
# What every answer row carries besides prob_<class>, in this order.
TEXT_COLUMNS = ("label", "error", "reason", "flags", *UID_FIELDS)
# `path` is accepted only when the operator names a folder here (paths inside it only).
PATH_ROOT_VARIABLE = "COVID_XRAY_PATH_ROOT"
# The device a loaded model answers on: auto (CUDA when visible), cpu or cuda.
DEVICE_VARIABLE = "COVID_XRAY_DEVICE"


class BadInput(UserError, MlflowException):
    """A request the model cannot answer at all: a one-line error in process, an HTTP 400
    whose message says what is wrong when served."""

    def __init__(self, message: str):
        MlflowException.__init__(self, message, error_code=INVALID_PARAMETER_VALUE)


class DicomClassifier(mlflow.pyfunc.PythonModel):
    """A trained `Classifier` plus the preprocessing it was trained with.

    Made whole in process (training), or empty by `served_model.py` and filled from the
    logged artifacts by `load_context` (loading)."""

    ARTIFACTS: ClassVar[dict[str, str]] = {"weights": "weights.pt", "spec": "model.json"}


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

    def spec(self) -> dict[str, Any]:
        """model.json: everything but the weights that the model needs to answer."""
        return {"architecture": self.architecture, "class_names": list(self.class_names),
                "tta": self.model.tta, "batch_size": self.batch_size,
                "preprocessing": self.preprocessing.as_dict()} | self.operating.as_dict()

    def save_artifacts(self, folder: Path) -> dict[str, str]:
        """Write the state a logged model is loaded from; returns MLflow's `artifacts`."""
        torch.save(self.model.network.state_dict(), folder / self.ARTIFACTS["weights"])
        (folder / self.ARTIFACTS["spec"]).write_text(json.dumps(self.spec(), indent=2) + "\n")
        saved = {key: str(folder / name) for key, name in self.ARTIFACTS.items()}
        if self.outliers is not None:  # plain arrays: read back without unpickling
            np.savez(folder / OUTLIERS_ARTIFACT, **self.outliers.as_arrays())
            saved["outliers"] = str(folder / OUTLIERS_ARTIFACT)
        return saved

    def load_context(self, context: Any) -> None:
        """Rebuild the model from its artifacts (a model pickled whole has none: as is)."""
        if "weights" not in context.artifacts:
            return
        spec = json.loads(Path(context.artifacts["spec"]).read_text())
        # On the meta device the layers get no random init (a DenseNet121's costs ~0.3 s);
        # assign=True then makes the loaded tensors the parameters themselves.
        with torch.device("meta"):
            network = architecture(spec["architecture"], len(spec["class_names"]))
        state = torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True)
        network.load_state_dict(state, assign=True)
        # Models logged before calibration existed answer as they did: T = 1, argmax.
        operating = OperatingPoint(
            temperature=spec.get("temperature", 1.0), threshold=spec.get("threshold"),
            operating_point=spec.get("operating_point", ARGMAX),
            training_prevalence=tuple(spec.get("training_prevalence", ())))
        self.__init__(Classifier(network, tuple(spec["class_names"]), tta=spec["tta"]),
                      Preprocessing(**spec["preprocessing"]), spec["batch_size"],
                      spec["architecture"], operating)
        if "outliers" in context.artifacts:  # models logged before it have no distance
            with np.load(context.artifacts["outliers"], allow_pickle=False) as arrays:
                self.outliers = FeatureDistance.from_arrays(dict(arrays))
        # Served (or loaded anywhere): the operator picks the device; CUDA when present.
        self.to_device(os.environ.get(DEVICE_VARIABLE, "auto"))
        # The training run, from the MLmodel file beside the artifacts (a registry load then
        # adds the registered name and version).
        logged = Path(context.artifacts["spec"]).parents[1] / "MLmodel"
        if logged.is_file():
            self.identity = ModelIdentity(run_id=mlflow.models.Model.load(logged).run_id or "")

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.model.class_names

    def predict(self, context: Any, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        frame = pd.DataFrame(model_input)
        # A `path` opens files whoever sends the input names (and would tell them which
        # exist): only base64 bytes, unless the operator names the one folder paths may use.
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
        decoded = [decode(self.preprocessing, _open(column, value, row, root))
                   for row, value in enumerate(frame[column])]
        try:
            probabilities, distances = self.answers(decoded)
        except Exception as error:  # the network itself failed (out of memory, say)
            probabilities = np.full((len(decoded), len(self.class_names)), np.nan)
            distances = np.full(len(decoded), np.nan)
            for row, item in enumerate(decoded):
                if not item.error:
                    item.error = (f"row {row}: the model could not score this input "
                                  f"({type(error).__name__})")
                    item.reason = "model_error"
        result = self.result_frame(probabilities, distances, decoded)
        if (params or {}).get("dicom_results"):
            self.attach_dicom_results(result, column, frame[column], decoded, root)
        if _served():
            # JSON has no NaN (browsers' JSON.parse rejects the whole reply): failed rows get
            # null probabilities. In process they stay NaN, pandas' missing value.
            for name in (*(f"prob_{name}" for name in self.class_names), "ood_score"):
                result[name] = result[name].astype(object).where(result[name].notna(), None)
        return result

    def heatmap_picture(self, file: Any, item: Decoded, label: str) -> np.ndarray:
        """The film (a path or an open file) at its own size, BGR, with the Grad-CAM of
        `label` over the square the model saw."""
        heatmap = grad_cam(self.model.network, item.model_input, self.class_names.index(label))
        if hasattr(file, "seek"):
            file.seek(0)
        return overlay(file, heatmap, self.preprocessing)

    def film_result(self, results: StudyResults, file: Any, item: Decoded,
                    probabilities: np.ndarray, label: str) -> tuple[Any, np.ndarray]:
        """For a scored film: its header goes to `results` (for its study's report); returns
        its Grad-CAM Secondary Capture and the overlay picture."""
        source = read_source(file)
        picture = self.heatmap_picture(file, item, label)
        image = results.heatmap(source, picture)
        results.add(source, probabilities, label)  # only once all of it worked
        return image, picture

    def attach_dicom_results(self, result: pd.DataFrame, column: str, values: pd.Series,
                             decoded: list[Decoded], root: str) -> None:
        """`sr_base64` (the report of the row's study: the same bytes on every row of one
        study) and `heatmap_base64` (the film's Grad-CAM Secondary Capture) as DICOM files in
        base64; empty for a row that was not scored. A film whose header defeats the writer
        keeps its answer and gets the flag `no_dicom_result`."""
        results = StudyResults(self.class_names, self.threshold, self.identity)
        probabilities = result[[f"prob_{name}" for name in self.class_names]].to_numpy()
        heatmaps, studies = [""] * len(result), [""] * len(result)
        for row, (value, item, label) in enumerate(zip(values, decoded, result.label,
                                                       strict=True)):
            if not label or has_flag(result["flags"][row], "patient_mismatch"):
                continue  # refused, or its study names two patients: no DICOM result
            try:
                image, _ = self.film_result(results, _open(column, value, row, root), item,
                                            probabilities[row], label)
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

    def result_frame(self, probabilities: np.ndarray, distances: np.ndarray | None = None,
                     decoded: list[Decoded] | None = None) -> pd.DataFrame:
        """One row per file: prob_<class>, then TEXT_COLUMNS, ood_score and
        in_distribution. A refused or unreadable file has its error and reason code, and no
        label or probabilities; a film far from the training films (distance over the
        model's threshold) keeps its probabilities for audit but gets no label, and the
        reason out_of_distribution."""
        if distances is None:
            distances = np.full(len(decoded), np.nan)
        frame = pd.DataFrame(probabilities.astype(np.float64),
                             columns=[f"prob_{name}" for name in self.class_names])
        called = predicted_classes(np.nan_to_num(probabilities, nan=-1), self.threshold)
        labels = [self.class_names[index] for index in called]
        limit = self.outliers.threshold if self.outliers is not None else np.inf
        outside = [not item.error and distance > limit
                   for item, distance in zip(decoded, distances, strict=True)]
        frame["label"] = [label if not item.error and not far else "" for label, item, far in
                          zip(labels, decoded, outside, strict=True)]
        frame["error"] = [item.error for item in decoded]
        frame["reason"] = ["out_of_distribution" if far else item.reason
                           for item, far in zip(decoded, outside, strict=True)]
        frame["flags"] = [" ".join(item.flags) for item in decoded]
        for key in UID_FIELDS:
            frame[key] = [item.uids.get(key, "") for item in decoded]
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


def _open(column: str, value: Any, row: int, root: str):
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
        return _RowPath(path, row)
    try:
        file = io.BytesIO(base64.b64decode(str(value), validate=True))
    except (binascii.Error, ValueError):
        return DicomError(f"row {row}: dicom_base64 is not valid base64")
    file.name = f"row {row}"
    return file


class _RowPath:
    """A path under the operator's folder that errors name by its row, as they name base64
    rows, never by the server's absolute path (os.PathLike: pydicom opens it)."""

    def __init__(self, path: Path, row: int):
        self.path, self.row = path, row

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return f"row {self.row}"


def _served() -> bool:
    """Whether this process is `mlflow models serve` (MLflow sets this flag in its scoring
    server, and while validating a model's example request as the server would)."""
    return os.environ.get("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "").lower() == "true"
