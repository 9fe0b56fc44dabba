"""The team tracking server, for real: PostgreSQL backend, basic-auth logins, proxied
artifacts (deploy/team-server.sh), with train and tune run through it. No password may reach a
param, tag, artifact or log line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT, TEAM_SECRETS, clean_env

TINY = ["--model", "none", "--img-size", "32", "--epochs", "1", "--num-workers", "0",
        "--batch-size", "16", "--device", "cpu", "--dataset-size", "60"]


def as_alice(server: dict, **extra: str) -> dict[str, str]:
    return clean_env(**{"MLFLOW_TRACKING_URI": server["url"], "MLFLOW_TRACKING_USERNAME": "alice",
                        "MLFLOW_TRACKING_PASSWORD": TEAM_SECRETS["alice"], **extra})


def alice_in_the_uri(server: dict, **extra: str) -> dict[str, str]:
    """The login written into the URI, as people do: MLflow would print it in every "View
    run ... at:" line; the project moves it into MLflow's login variables first."""
    uri = server["url"].replace("http://", f"http://alice:{TEAM_SECRETS['alice']}@")
    return {key: value for key, value in clean_env(MLFLOW_TRACKING_URI=uri, **extra).items()
            if key not in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}


def test_train_and_tune_through_the_team_server(team_server, demo_dataset, tmp_path,
                                                monkeypatch):
    trained = subprocess.run(
        [str(Path(sys.executable).with_name("mlflow")), "run", str(ROOT), "-e", "train",
         "--env-manager", "local",  # no --experiment-name: into Default, as documented
         "-P", f"data_dir={demo_dataset}", "-P", f"cache_dir={tmp_path / 'cache'}",
         "-P", "model=none", "-P", "img_size=32", "-P", "epochs=1", "-P", "num_workers=0",
         "-P", "dataset_size=60", "-P", "registered_model_name=team-model",
         "-P", "alias=champion"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env=as_alice(team_server))
    # A user who is not the admin writes into Default (a 403 traceback when it was
    # read-only to them).
    assert trained.returncode == 0, trained.stderr[-3000:]
    # The Optuna study lives in the same PostgreSQL instance, in its own database.
    tuned = subprocess.run(
        [sys.executable, str(ROOT / "entrypoints" / "tune.py"), "--data-dir", str(demo_dataset),
         "--cache-dir", str(tmp_path / "cache"), *TINY, "--n-trials", "2",
         "--study-name", "team", "--experiment-name", "team"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env=alice_in_the_uri(team_server, OPTUNA_STORAGE=team_server["optuna_url"]))
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    # Every "View run ... at:" line names the server without the login it was given in.
    views = [line for line in tuned.stdout.splitlines() if "View run" in line]
    assert views and all(f"at: {team_server['url']}/#/experiments/" in line for line in views)

    for name, value in (("MLFLOW_TRACKING_USERNAME", "alice"),
                        ("MLFLOW_TRACKING_PASSWORD", TEAM_SECRETS["alice"])):
        monkeypatch.setenv(name, value)
    client = MlflowClient(tracking_uri=team_server["url"], registry_uri=team_server["url"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    names = sorted(run.info.run_name for run in runs)
    assert "study-team" in names and "trial-0" in names and "trial-1" in names
    assert {run.info.status for run in runs} == {"FINISHED"}
    (train_run,) = [run for run in runs if run.info.run_name.startswith("train-")]
    assert client.get_experiment(train_run.info.experiment_id).name == "Default"
    assert client.get_model_version_by_alias("team-model", "champion").version in ("1", 1)

    # Every secret stays out of every record: params, tags, artifacts, outputs, server log.
    seen = [trained.stdout, trained.stderr, tuned.stdout, tuned.stderr,
            team_server["log"].read_text()]
    for run in runs:
        seen += [f"{k}={v}" for k, v in {**run.data.params, **run.data.tags}.items()]
        seen += artifact_texts(client, run.info.run_id)
    text = "\n".join(seen)
    assert "postgresql://postgres:***@" in text  # the Optuna storage, logged masked
    for name, secret in TEAM_SECRETS.items():
        assert secret not in text, f"the {name} password leaked"


def artifact_texts(client: MlflowClient, run_id: str, path: str = "") -> list[str]:
    """The contents of a run's text artifacts (MLmodel, requirements, manifests...)."""
    texts = []
    for item in client.list_artifacts(run_id, path):
        if item.is_dir:
            texts += artifact_texts(client, run_id, item.path)
        elif item.path.endswith((".txt", ".csv", ".yaml", ".json", "MLmodel")):
            texts.append(Path(client.download_artifacts(run_id, item.path)).read_text())
    return texts


@pytest.mark.parametrize("password", ["wrong-password", ""])
def test_a_wrong_password_is_one_line_before_any_data_work(team_server, demo_dataset, tmp_path,
                                                            password):
    env = as_alice(team_server, MLFLOW_TRACKING_PASSWORD=password)
    if not password:
        env.pop("MLFLOW_TRACKING_USERNAME")
        env.pop("MLFLOW_TRACKING_PASSWORD")
    done = subprocess.run(
        [sys.executable, str(ROOT / "entrypoints" / "train.py"), "--data-dir", str(demo_dataset),
         "--cache-dir", str(tmp_path / "cache"), *TINY],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 2
    who = "user 'alice'" if password else "an anonymous user (no MLFLOW_TRACKING_USERNAME)"
    assert done.stderr.strip().splitlines() == [
        f"error: MLflow tracking server {team_server['url']} refused {who} (HTTP 401); check "
        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"]
    assert not (tmp_path / "cache").exists()
