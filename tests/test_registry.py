"""Promotion by stage and alias, the if-better rule, and clear errors when loading."""

from __future__ import annotations

import subprocess
import sys
import uuid

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from sklearn.dummy import DummyClassifier

from covid_xray.errors import UserError
from covid_xray.pyfunc import DicomClassifier
from covid_xray.registry import load, promote
from tests.conftest import ROOT, clean_env


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
    assert promote(name, "1", stage="Production").promoted
    assert stages(name) == {"1": "Production", "2": "None"}
    result = promote(name, "2", stage="Production")
    assert result.message == f"{name} version 2 -> stage Production"
    assert stages(name) == {"1": "Archived", "2": "Production"}


def test_alias_moves(store):
    name = new_versions(store, [0.8, 0.9])
    promote(name, "1", alias="champion")
    assert str(MlflowClient().get_model_version_by_alias(name, "champion").version) == "1"
    promote(name, "2", alias="champion")
    assert str(MlflowClient().get_model_version_by_alias(name, "champion").version) == "2"


def test_if_better_promotes_only_a_better_candidate(store):
    name = new_versions(store, [0.9, 0.85, 0.95])
    assert promote(name, "1", stage="Production", alias="champion").promoted
    worse = promote(name, "2", stage="Production", alias="champion", if_better="roc_auc")
    assert not worse.promoted
    assert worse.message == ("not promoted: version 2 has roc_auc 0.8500, current version 1 "
                             "has 0.9000")
    assert stages(name) == {"1": "Production", "2": "None", "3": "None"}
    better = promote(name, "3", stage="Production", alias="champion", if_better="roc_auc")
    assert better.promoted
    assert stages(name) == {"1": "Archived", "2": "None", "3": "Production"}
    assert str(MlflowClient().get_model_version_by_alias(name, "champion").version) == "3"
    # With no current holder there is nothing to beat.
    assert promote(name, "2", stage="Staging", if_better="roc_auc").promoted


def test_promote_errors(store):
    name = new_versions(store, [0.9])
    with pytest.raises(UserError, match=f"registered model '{name}' has no version 7"):
        promote(name, "7", stage="Production")
    with pytest.raises(UserError, match="its run has no metric test_sensitivity"):
        promote(name, "1", stage="Production", if_better="sensitivity")
    with pytest.raises(UserError, match="nothing to do"):
        promote(name, "1")
    with pytest.raises(UserError, match="stage must be one of"):
        promote(name, "1", stage="production")


def test_load_by_stage_alias_and_version(store):
    for uri in ("models:/covid-xray-densenet/Production", "models:/covid-xray-densenet@champion",
                "models:/covid-xray-densenet/1"):
        model = load(uri)
        assert isinstance(model, DicomClassifier)
        assert model.class_names == ("negative", "positive")
        assert model.preprocessing.img_size == 32


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
    assert refused.returncode == 0 and refused.stdout.startswith("not promoted: version 2")
    missing = subprocess.run([*script, "--version", "9", "--alias", "x"], env=env,
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        f"error: registered model '{name}' has no version 9"]
    assert "FutureWarning" not in done.stderr + refused.stderr  # no deprecation noise
