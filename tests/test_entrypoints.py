"""The Click scripts and MLproject: options mirror the configs, errors are one line."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import yaml

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


@pytest.mark.parametrize(("entry_point", "config"), [
    ("train", TrainConfig), ("main", TrainConfig), ("download", DownloadConfig),
    ("promote", PromoteConfig), ("predict", PredictConfig), ("evaluate", EvaluateConfig)])
def test_mlproject_mirrors_the_config(entry_point, config):
    project = yaml.safe_load((ROOT / "MLproject").read_text())
    assert project["name"] == "covid-xray" and project["conda_env"] == "conda.yaml"
    declared = project["entry_points"][entry_point]
    fields = {item.name: item.default for item in dataclasses.fields(config)}
    assert list(declared["parameters"]) == list(fields)
    for name, default in fields.items():
        written = declared["parameters"][name]["default"]
        assert str(written).lower() == str(default).lower(), name
        assert f"--{name.replace('_', '-')} {{{name}}}" in declared["command"]
    assert declared["command"].startswith(f"python entrypoints/{'train' if entry_point == 'main' else entry_point}.py ")


def test_mlproject_tune_takes_tune_and_train_options():
    declared = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]["tune"]
    tune_fields = [item.name for item in dataclasses.fields(TuneConfig)]
    train_fields = [item.name for item in dataclasses.fields(TrainConfig)]
    assert list(declared["parameters"]) == tune_fields + train_fields
    for name in train_fields:  # unset unless the user fixes it
        assert declared["parameters"][name]["default"] == ""
    for name in tune_fields + train_fields:
        assert f"--{name.replace('_', '-')} {{{name}}}" in declared["command"]


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
