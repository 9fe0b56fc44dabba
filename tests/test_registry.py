"""Promotion by stage and alias, the if-better rule, and clear errors when loading."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from sklearn.dummy import DummyClassifier

from covid_xray.config import PromoteConfig
from covid_xray.errors import UserError
from covid_xray.evaluation import metrics
from covid_xray.model.networks import Classifier, build
from covid_xray.model.pyfunc import DicomClassifier
from covid_xray.serving.evaluate import FINGERPRINT_TAG, MODEL_NAME_TAG, MODEL_VERSION_TAG
from covid_xray.serving.promotion import promote
from covid_xray.tracking import mlflow_run
from covid_xray.tracking.registry import load
from tests.conftest import REAL_DICOM, ROOT, clean_env


def new_versions(store: dict, aucs: list[float]) -> str:
    """A fresh registered model whose versions share the trained weights but come from runs
    with the given test AUCs; returns its name."""
    client = MlflowClient()
    source = client.get_model_version(store["name"], "1").source
    name = f"promote-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(name)
    for auc in aucs:
        with mlflow.start_run() as run:
            mlflow.log_metric("test_roc_auc", auc)
        client.create_model_version(name, source, run_id=run.info.run_id)
    return name


def stages(name: str) -> dict[str, str]:
    return {str(v.version): v.current_stage
            for v in MlflowClient().search_model_versions(f"name='{name}'")}


def test_stage_moves_archive_the_previous_holder(store):
    name = new_versions(store, [0.8, 0.9])
    assert promote(PromoteConfig(name, "1", stage="Production")).promoted
    assert stages(name) == {"1": "Production", "2": "None"}
    result = promote(PromoteConfig(name, "2", stage="Production"))
    assert result.message == f"{name} version 2 -> stage Production"
    assert stages(name) == {"1": "Archived", "2": "Production"}


def test_alias_moves(store):
    name = new_versions(store, [0.8, 0.9])
    promote(PromoteConfig(name, "1", alias="champion"))
    assert str(MlflowClient().get_model_version_by_alias(name, "champion").version) == "1"
    promote(PromoteConfig(name, "2", alias="champion"))
    assert str(MlflowClient().get_model_version_by_alias(name, "champion").version) == "2"
    # Each move is a named run holding what moved.
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                filter_string=f"attributes.run_name = 'promote-{name}-v2'")
    assert run.data.tags["promote_decision"] == "promoted"
    decision = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/decision.txt")
    assert decision == f"{name} version 2 -> alias @champion\n"


STUDIES = 120
TRUTH = np.repeat([0, 1], STUDIES // 2)


def answers(skill: float, wobble: int = 0, confidence: float = 1.0) -> np.ndarray:
    """Binary probabilities for TRUTH from a model whose scores separate the classes by
    `skill`, over noise every such model shares (they read the same films); `wobble` seeds a
    little noise of its own (another training of nearly the same model); `confidence` scales
    the logits (above 1: overconfident, the same ranking)."""
    shared = np.random.default_rng(0).normal(size=STUDIES)
    own = np.random.default_rng(wobble).normal(scale=0.3, size=STUDIES) if wobble else 0.0
    logits = confidence * (skill * (2 * TRUTH - 1) + shared + own)
    positive = 1 / (1 + np.exp(-logits))
    return np.stack([1 - positive, positive], axis=1)


def evaluated(name: str, version: str, fingerprint: str, probabilities: np.ndarray) -> None:
    """An evaluation run as `evaluate` logs it: tags naming the version and the data, the
    eval_<metric> point estimates, and the per-study predictions.csv."""
    tags = {MODEL_NAME_TAG: name, MODEL_VERSION_TAG: version, FINGERPRINT_TAG: fingerprint}
    names = ("negative", "opacity")
    values = metrics.batched(TRUTH[None], probabilities[None], names)
    predictions = pd.DataFrame({"study_id": [f"{i:012x}" for i in range(STUDIES)],
                                "truth": [names[label] for label in TRUTH],
                                "prob_negative": probabilities[:, 0],
                                "prob_opacity": probabilities[:, 1], "error": ""})
    with mlflow.start_run(tags=tags):
        mlflow.log_metrics({f"eval_{metric}": float(value[0]) for metric, value in values.items()})
        mlflow.log_text(predictions.to_csv(index=False), "predictions.csv")


def test_if_better_promotes_only_a_better_candidate(store):
    name = new_versions(store, [0.9, 0.85, 0.95])
    for version, skill in (("1", 1.0), ("2", 0.5), ("3", 2.0)):
        evaluated(name, version, "fingerprint-a", answers(skill))
    assert promote(PromoteConfig(name, "1", stage="Production", alias="champion")).promoted
    worse = promote(PromoteConfig(name, "2", stage="Production", alias="champion",
                                  if_better="roc_auc"))
    assert not worse.promoted
    assert re.fullmatch(r"not promoted: version 2 vs version 1: roc_auc difference -0\.\d{4} "
                        r"\(95% CI -0\.\d{4} to -0\.\d{4}, paired over 120 studies\) of the "
                        r"same data \(fingerprint-\); version 2 is not better", worse.message)
    assert stages(name) == {"1": "Production", "2": "None", "3": "None"}
    better = promote(PromoteConfig(name, "3", stage="Production", alias="champion",
                                   if_better="roc_auc"))
    assert better.promoted
    assert re.search(r"\(version 3 vs version 1: roc_auc difference \+0\.\d{4} \(95% CI "
                     r"\+0\.\d{4} to \+0\.\d{4}, paired over 120 studies\) of the same data "
                     r"\(fingerprint-\)\)$", better.message)
    assert stages(name) == {"1": "Archived", "2": "None", "3": "Production"}
    assert str(MlflowClient().get_model_version_by_alias(name, "champion").version) == "3"
    # With no current holder there is nothing to beat.
    assert promote(PromoteConfig(name, "2", stage="Staging", if_better="roc_auc")).promoted


def test_a_point_difference_inside_the_paired_interval_does_not_promote(store):
    """The candidate's AUC is higher, but by less than chance explains: it stays where it is,
    and the promote run holds the paired difference and its interval. min_delta asks for a
    margin on top."""
    name = new_versions(store, [0.9, 0.9, 0.9])
    holder = answers(1.0)
    candidate = next(answers(1.0, wobble=seed) for seed in range(1, 100)
                     if metrics.batched(TRUTH[None], answers(1.0, wobble=seed)[None],
                                        ("negative", "opacity"))["roc_auc"][0]
                     > metrics.batched(TRUTH[None], holder[None],
                                       ("negative", "opacity"))["roc_auc"][0])
    evaluated(name, "1", "same-studies", holder)
    evaluated(name, "2", "same-studies", candidate)
    evaluated(name, "3", "same-studies", answers(2.0))
    promote(PromoteConfig(name, "1", alias="champion"))
    refused = promote(PromoteConfig(name, "2", alias="champion", if_better="roc_auc"))
    assert not refused.promoted
    assert refused.message.startswith("not promoted: version 2 vs version 1: roc_auc difference +")
    assert refused.message.endswith("; the interval includes 0, so the difference may be chance")
    [run] = mlflow.search_runs(filter_string=f"attributes.run_name = 'promote-{name}-v2'",
                               search_all_experiments=True, output_format="list")
    assert run.data.tags["promote_candidate"] == "2"
    assert run.data.tags["promote_decision"] == "not promoted"
    delta = run.data.metrics
    assert delta["delta_roc_auc_vs_v1_ci_low"] < 0 < delta["delta_roc_auc_vs_v1"] < delta[
        "delta_roc_auc_vs_v1_ci_high"]
    assert str(MlflowClient().get_model_version_by_alias(name, "champion").version) == "1"

    demanding = promote(PromoteConfig(name, "3", alias="champion", if_better="roc_auc",
                                      min_delta=0.5))
    assert not demanding.promoted
    assert demanding.message.endswith("; the interval does not clear min_delta 0.5")
    assert promote(PromoteConfig(name, "3", alias="champion", if_better="roc_auc",
                                 min_delta=0.01)).promoted


def test_if_better_knows_which_way_is_better(store):
    name = new_versions(store, [0.9, 0.9])
    evaluated(name, "1", "same-data", answers(1.0))
    evaluated(name, "2", "same-data", answers(1.0, confidence=0.2))  # same ranking, timid
    promote(PromoteConfig(name, "1", alias="champion"))
    # A higher ECE is worse calibration: version 2 loses on it; on AUC the two are one model.
    worse = promote(PromoteConfig(name, "2", alias="champion", if_better="ece"))
    assert not worse.promoted and worse.message.endswith("version 2 is not better")
    same = promote(PromoteConfig(name, "2", alias="champion", if_better="roc_auc"))
    assert not same.promoted and "roc_auc difference +0.0000 (95% CI +0.0000 to +0.0000" in (
        same.message)
    with pytest.raises(UserError, match="'val_loss' is not an evaluation metric"):
        promote(PromoteConfig(name, "1", alias="champion", if_better="val_loss"))


def test_if_better_refuses_evidence_that_is_not_comparable(store):
    name = new_versions(store, [0.7, 0.99])  # own test splits: different data, never compared
    promote(PromoteConfig(name, "1", stage="Production"))
    with pytest.raises(UserError, match=r"^not comparable: versions 2 and 1 of .* have no "
                                        r"evaluation on the same data .* -P evaluate_on=PATH"):
        promote(PromoteConfig(name, "2", stage="Production", if_better="roc_auc"))
    evaluated(name, "1", "hospital-a", answers(1.0))
    evaluated(name, "2", "hospital-b", answers(2.0))
    with pytest.raises(UserError, match="not comparable: versions 2 and 1"):
        promote(PromoteConfig(name, "2", stage="Production", if_better="roc_auc"))
    assert stages(name) == {"1": "Production", "2": "None"}


def test_if_better_refuses_a_model_of_another_task(store):
    name = new_versions(store, [0.9])
    binary = load(f"models:/{name}/1")
    four = Classifier(build("none", 4), ("negative", "typical", "indeterminate", "atypical"))
    with mlflow.start_run():
        info = mlflow_run.log_model(DicomClassifier(four, binary.preprocessing))
    MlflowClient().create_model_version(name, info.model_uri)
    evaluated(name, "1", "same-data", answers(1.0))
    evaluated(name, "2", "same-data", answers(2.0))
    promote(PromoteConfig(name, "1", alias="champion"))
    with pytest.raises(UserError, match=r"not comparable: the versions solve different tasks "
                                        r"\(version 2: negative/typical/indeterminate/atypical, "
                                        r"version 1: negative/opacity\)"):
        promote(PromoteConfig(name, "2", alias="champion", if_better="roc_auc"))


def test_promote_errors(store):
    name = new_versions(store, [0.9])
    with pytest.raises(UserError, match=f"registered model '{name}' has no version 7"):
        promote(PromoteConfig(name, "7", stage="Production"))
    with pytest.raises(UserError, match="nothing to do"):
        promote(PromoteConfig(name, "1"))
    with pytest.raises(UserError, match="stage must be one of"):
        promote(PromoteConfig(name, "1", stage="production"))
    with pytest.raises(UserError, match="evaluate_on goes with if_better"):
        promote(PromoteConfig(name, "1", stage="Production", evaluate_on="data"))


def test_load_by_stage_alias_and_version(store):
    for uri in ("models:/covid-xray-densenet/Production", "models:/covid-xray-densenet@champion",
                "models:/covid-xray-densenet/1"):
        model = load(uri)
        assert isinstance(model, DicomClassifier)
        assert model.class_names == ("negative", "opacity")
        assert model.preprocessing.img_size == 32


def test_code_model_has_no_pickle_and_pickled_models_still_load(store, monkeypatch):
    """Train logs code + weights + model.json; a model logged whole (cloudpickle, as before
    models-from-code) still loads and answers exactly the same."""
    current = load("models:/covid-xray-densenet@champion")
    source = MlflowClient().get_model_version("covid-xray-densenet", "1").source
    folder = Path(mlflow.artifacts.download_artifacts(source))
    assert not list(folder.rglob("*.pkl"))
    spec = json.loads((folder / "artifacts" / "model.json").read_text())
    operating = {key: spec.pop(key) for key in ("temperature", "threshold", "operating_point",
                                                "training_prevalence")}
    assert spec == {"architecture": "none", "class_names": ["negative", "opacity"],
                    "tta": "flip", "batch_size": 16,
                    "preprocessing": {"img_size": 32, "normalization": "minmax",
                                      "apply_voi_lut": True, "input_kind": "xrv"}}
    # Fitted on the val split after training; the model answers with them.
    assert operating["operating_point"] == "youden"
    assert 0.05 <= operating["temperature"] <= 20
    assert current.model.temperature == operating["temperature"]
    assert 0 < operating["threshold"] < 1 and current.threshold == operating["threshold"]
    assert sum(operating["training_prevalence"]) == pytest.approx(1, abs=1e-5)
    with mlflow.start_run():
        pickled = mlflow.pyfunc.log_model(name="pickled", python_model=current,
                                          code_paths=[str(mlflow_run.PACKAGE_DIR)])
    old = load(pickled.model_uri)
    frame = pd.DataFrame({"path": [str(REAL_DICOM)]})
    monkeypatch.setenv("COVID_XRAY_PATH_ROOT", str(REAL_DICOM.parent))
    pd.testing.assert_frame_equal(old.predict(None, frame), current.predict(None, frame))


@pytest.mark.parametrize(("uri", "message"), [
    ("models:/no-such-model/Production", "cannot load model 'models:/no-such-model/Production': "),
    ("models:/covid-xray-densenet/Staging", "cannot load model 'models:/covid-xray-densenet/Staging': "),
    ("models:/covid-xray-densenet@nobody", "cannot load model 'models:/covid-xray-densenet@nobody': "),
    ("models:/", "cannot load model 'models:/': "),
])
def test_load_errors_are_one_line(store, uri, message):
    with pytest.raises(UserError) as caught:
        load(uri)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_a_model_logged_by_something_else(store, tmp_path):
    with mlflow.start_run():
        info = mlflow.sklearn.log_model(DummyClassifier().fit([[0], [1]], [0, 1]), name="m")
    with pytest.raises(UserError, match="is not a covid-xray model"):
        load(info.model_uri)


def test_promote_cli(store):
    name = new_versions(store, [0.7, 0.6])
    script = [sys.executable, str(ROOT / "entrypoints" / "promote.py"), "--name", name]
    env = clean_env(MLFLOW_TRACKING_URI=store["uri"])
    done = subprocess.run([*script, "--version", "1", "--stage", "Production"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == f"{name} version 1 -> stage Production"
    refused = subprocess.run([*script, "--version", "2", "--stage", "Production",
                              "--if-better", "roc_auc"], env=env, capture_output=True, text=True,
                             timeout=300)
    assert refused.returncode == 2
    assert len(refused.stderr.strip().splitlines()) == 1
    assert refused.stderr.startswith("error: not comparable: versions 2 and 1")
    missing = subprocess.run([*script, "--version", "9", "--alias", "x"], env=env,
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        f"error: registered model '{name}' has no version 9"]
    assert "FutureWarning" not in done.stderr + refused.stderr  # no deprecation noise
    assert stages(name) == {"1": "Production", "2": "None"}
