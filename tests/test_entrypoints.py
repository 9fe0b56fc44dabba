"""The Click scripts and MLproject: options mirror the configs, errors are one line."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import yaml

from covid_xray import project
from covid_xray.config import (
    DownloadConfig,
    EvaluateConfig,
    PredictConfig,
    PromoteConfig,
    TrainConfig,
    TuneConfig,
)
from tests.conftest import ROOT


def run_script(name: str, *args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "entrypoints" / f"{name}.py"), *args],
                          cwd=cwd, capture_output=True, text=True, timeout=600)


def test_generated_files_are_fresh():
    """One source of truth: `python -m covid_xray.project` writes MLproject and the tables of
    docs/options.md from config.py, the environment files from pyproject.toml's dependencies."""
    for name, render in project.GENERATED.items():
        assert (ROOT / name).read_text() == render(), (
            f"{name} is stale: run `python -m covid_xray.project`")
    environment = yaml.safe_load((ROOT / "python_env.yaml").read_text())
    assert environment["dependencies"] == project.dependencies()
    assert "torch==2.14.1" in environment["dependencies"]
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    assert conda["dependencies"][-1]["pip"] == project.dependencies()
    options = project.OPTIONS_DOC.read_text()
    assert project.options_doc(options) == options, (
        "docs/options.md's tables are stale: run `python -m covid_xray.project`")


@pytest.mark.parametrize(("entry_point", "config"), [
    ("train", TrainConfig), ("main", TrainConfig), ("download", DownloadConfig),
    ("promote", PromoteConfig), ("predict", PredictConfig), ("evaluate", EvaluateConfig),
    ("tune", TuneConfig)])
def test_mlproject_declares_each_option_with_its_default(entry_point, config):
    declared = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"][entry_point]
    fields = {item.name: item.default for item in dataclasses.fields(config)}
    assert list(declared["parameters"]) == list(fields)  # tune: its own, none of train's
    for name, default in fields.items():
        written = declared["parameters"][name]["default"]
        assert str(written).lower() == str(default).lower(), name
        assert f"--{name.replace('_', '-')} {{{name}}}" in declared["command"]
    script = "train" if entry_point == "main" else entry_point
    assert declared["command"].startswith(f"python -m entrypoints.{script} ")


@pytest.mark.parametrize("name", ["download", "train", "tune", "promote", "predict", "evaluate"])
def test_help(name):
    result = run_script(name, "--help")
    assert result.returncode == 0 and "Usage:" in result.stdout and "--" in result.stdout


def test_download_synthetic_then_refuse_overwrite(tmp_path):
    result = run_script("download", "--source", "synthetic", "--data-dir", str(tmp_path / "d"),
                        "--num-studies", "5", "--image-size", "32")
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "d").glob("train/*/*/*.dcm"))) >= 5
    again = run_script("download", "--source", "synthetic", "--data-dir", str(tmp_path / "d"))
    assert again.returncode == 0 and "already holds a dataset" in again.stdout


def test_download_bad_input_is_one_line(tmp_path):
    result = run_script("download", "--source", "synthetic", "--data-dir", str(tmp_path),
                        "--num-studies", "0")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: synthetic data needs num_studies >= 1 and image_size >= 16"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # seven fresh interpreters, each importing torch and MLflow
@pytest.mark.parametrize(("name", "args"), [
    ("train", ["--data-dir", "DATA", "--model", "none"]),
    ("tune", ["--data-dir", "DATA", "--model", "none", "--n-trials", "1"]),
    ("predict", ["--input", "DATA/train"]),
    ("score_spark", ["--input", "DATA/train"]),
    ("evaluate", ["--data-dir", "DATA"]),
    ("promote", ["--version", "1", "--alias", "champion"]),
    ("promote", ["--version", "1", "--alias", "champion", "--if-better", "roc_auc"]),
])
def test_no_tracking_server_is_one_line_within_seconds(tiny_dataset, tmp_path, name, args):
    """MLflow's client retries for ~4 minutes (predict, promote did; promote then blamed a
    missing version). A closed port on this machine must fail at once, naming the URI, and
    leave no file behind (tune used to create optuna.db first)."""
    from tests.conftest import clean_env, free_port

    uri = f"http://127.0.0.1:{free_port()}"
    command = [sys.executable, str(ROOT / "entrypoints" / f"{name}.py"),
               *[arg.replace("DATA", str(tiny_dataset)) for arg in args]]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=90,
                          env=clean_env(MLFLOW_TRACKING_URI=uri))
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [
        f"error: MLflow tracking server {uri} is unreachable (ConnectionError); start it (e.g. "
        "`mlflow server --host 127.0.0.1`) or unset MLFLOW_TRACKING_URI to use the local "
        "mlflow.db"]
    assert list(tmp_path.iterdir()) == []  # no cache, optuna.db or CSV was started


def test_a_login_in_the_tracking_uri_moves_to_mlflows_login_variables(monkeypatch, capsys):
    """MLflow prints the tracking URI in every "View run ... at:" line: a login written into
    it leaves the URI before anything prints it (quoted characters decoded), and under `mlflow
    run`, whose own process prints the URI once more, the user is told where it belongs."""
    import os

    from covid_xray.cli import credentials_out_of_uri

    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://alice:p%40ss%3Aword@mlflow.example:5000/x")
    credentials_out_of_uri()
    assert os.environ["MLFLOW_TRACKING_URI"] == "https://mlflow.example:5000/x"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "alice"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "p@ss:word"
    assert capsys.readouterr().err == ""

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://bob:secret@127.0.0.1:5000")
    monkeypatch.setenv("MLFLOW_RUN_ID", "0123")
    credentials_out_of_uri()
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"
    err = capsys.readouterr().err
    assert "secret" not in err and err.startswith("warning: MLFLOW_TRACKING_URI holds a login")
    credentials_out_of_uri()  # nothing left to move: a no-op
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "secret"


def test_allowed_values_are_written_once_in_config():
    """No module but config.py spells out a list of an option's allowed values (two of them or
    more in one tuple, list or set): modules read them from config, so a new value cannot
    reach the option and miss its implementation, or the other way round."""
    import ast

    from covid_xray import config

    choices = {item.metadata["choices"] for config_class in project.ENTRY_POINTS.values()
               for item in dataclasses.fields(config_class) if item.metadata.get("choices")}
    choices |= {config.BALANCES, config.OVERLAP_RULES, config.INPUT_KINDS}
    written = []
    for path in sorted((ROOT / "covid_xray").rglob("*.py")):
        if path.name == "config.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Tuple | ast.List | ast.Set):
                continue
            values = {element.value for element in node.elts
                      if isinstance(element, ast.Constant) and isinstance(element.value, str)}
            if len(values) >= 2 and any(values <= set(allowed) for allowed in choices):
                written.append(f"{path.relative_to(ROOT)}:{node.lineno} {sorted(values)}")
    assert not written, "\n".join(written)


def test_an_errors_first_line_is_what_a_users_line_quotes():
    """One rule for every message that quotes another library's error: its first line
    (an MlflowException's message, without the error code), at most 300 characters."""
    from mlflow.exceptions import MlflowException

    from covid_xray.errors import first_line

    assert first_line(ValueError("\n  no such table: runs  \n[SQL: select ...]")) == \
        "no such table: runs"
    assert first_line(MlflowException("Registered Model 'x' not found\n<html>...",
                                      error_code="RESOURCE_DOES_NOT_EXIST")) == \
        "Registered Model 'x' not found"
    assert first_line(RuntimeError()) == "" and first_line("  ") == ""
    assert first_line("y" * 400) == "y" * 300 and first_line("y" * 400, 20) == "y" * 20


def test_a_password_in_a_url_is_masked_wherever_it_is_shown():
    """One rule for the Optuna storage, the node's destinations and their errors."""
    from covid_xray.credentials import hide_password

    assert hide_password("postgresql://postgres:s3cret@db:5432/optuna") == \
        "postgresql://postgres:***@db:5432/optuna"
    assert hide_password("send_to 'dicomweb:https://node:s3cret@pacs/dicom-web' and "
                         "http://a:b@c") == \
        "send_to 'dicomweb:https://node:***@pacs/dicom-web' and http://a:***@c"
    assert hide_password("postgresql://mlflow:database password@db-host/optuna") == \
        "postgresql://mlflow:***@db-host/optuna"  # as docs/team-server.md writes one
    assert hide_password("postgresql://postgres@db/optuna") == "postgresql://postgres@db/optuna"
    assert hide_password("dimse:PACS@10.0.0.5:104") == "dimse:PACS@10.0.0.5:104"
