"""A logged model's state on disk, written after training and read back by `load_context`.

`weights.pt` (the network's state_dict, read with `weights_only=True`), `model.json`
(architecture, classes, TTA, the `preprocess.Preprocessing` training used, so predictions see
images exactly as training did, and the operating point: temperature, threshold, the rule
that chose it, training prevalence) and, once fitted, `outliers.npz` (the distance to the
training films, plain arrays). Nothing is unpickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch

from covid_xray.evaluation.calibration import ARGMAX, OperatingPoint
from covid_xray.evaluation.outliers import FeatureDistance
from covid_xray.imaging.preprocess import Preprocessing
from covid_xray.model.dicom_results import ModelIdentity
from covid_xray.model.networks import Classifier, architecture

FILES = {"weights": "weights.pt", "spec": "model.json"}
OUTLIERS_FILE = "outliers.npz"  # the fitted distance to the training films


@dataclass
class ModelParts:
    """Everything a `DicomClassifier` is made of, as read back from its artifacts."""

    model: Classifier
    preprocessing: Preprocessing
    batch_size: int
    architecture: str
    operating: OperatingPoint
    outliers: FeatureDistance | None
    identity: ModelIdentity


def spec(classifier: Any) -> dict[str, Any]:
    """model.json: everything but the weights that the model needs to answer."""
    return {"architecture": classifier.architecture,
            "class_names": list(classifier.class_names), "tta": classifier.model.tta,
            "batch_size": classifier.batch_size,
            "preprocessing": classifier.preprocessing.as_dict()} | classifier.operating.as_dict()


def save(classifier: Any, folder: Path) -> dict[str, str]:
    """Write the state a logged model is loaded from (a `DicomClassifier`'s); returns
    MLflow's `artifacts`."""
    torch.save(classifier.model.network.state_dict(), folder / FILES["weights"])
    (folder / FILES["spec"]).write_text(json.dumps(spec(classifier), indent=2) + "\n")
    saved = {key: str(folder / name) for key, name in FILES.items()}
    if classifier.outliers is not None:  # plain arrays: read back without unpickling
        np.savez(folder / OUTLIERS_FILE, **classifier.outliers.as_arrays())
        saved["outliers"] = str(folder / OUTLIERS_FILE)
    return saved


def load(artifacts: dict[str, str]) -> ModelParts:
    """The parts of a model from its artifacts (MLflow's `context.artifacts`)."""
    spec = json.loads(Path(artifacts["spec"]).read_text())
    # On the meta device the layers get no random init (a DenseNet121's costs ~0.3 s);
    # assign=True then makes the loaded tensors the parameters themselves.
    with torch.device("meta"):
        network = architecture(spec["architecture"], len(spec["class_names"]))
    state = torch.load(artifacts["weights"], map_location="cpu", weights_only=True)
    network.load_state_dict(state, assign=True)
    # Models logged before calibration existed answer as they did: T = 1, argmax.
    operating = OperatingPoint(
        temperature=spec.get("temperature", 1.0), threshold=spec.get("threshold"),
        operating_point=spec.get("operating_point", ARGMAX),
        training_prevalence=tuple(spec.get("training_prevalence", ())))
    outliers = None
    if "outliers" in artifacts:  # models logged before it have no distance
        with np.load(artifacts["outliers"], allow_pickle=False) as arrays:
            outliers = FeatureDistance.from_arrays(dict(arrays))
    # The training run, from the MLmodel file beside the artifacts (a registry load then
    # adds the registered name and version).
    logged = Path(artifacts["spec"]).parents[1] / "MLmodel"
    run_id = (mlflow.models.Model.load(logged).run_id or "") if logged.is_file() else ""
    identity = ModelIdentity(run_id=run_id)
    return ModelParts(Classifier(network, tuple(spec["class_names"]), tta=spec["tta"]),
                      Preprocessing(**spec["preprocessing"]), spec["batch_size"],
                      spec["architecture"], operating, outliers, identity)
