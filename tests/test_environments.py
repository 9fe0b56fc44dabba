"""`mlflow run . --env-manager uv`: MLflow builds a clean environment from python_env.yaml (no
conda, no install of this project) and the entry points import the project from its folder."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT, clean_env, uv_sources_like_pip

pytestmark = [pytest.mark.slow, pytest.mark.heavy]  # mlflow run, installs and trains


def test_mlflow_run_with_uv_builds_the_environment_from_python_env_yaml(tmp_path):
    # The project as a clone holds it, and no install of it anywhere MLflow's env can see.
    clone = tmp_path / "covid-xray"
    for folder in ("covid_xray", "entrypoints"):
        shutil.copytree(ROOT / folder, clone / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("MLproject", "python_env.yaml", "conda.yaml", "pyproject.toml"):
        shutil.copy2(ROOT / name, clone / name)
    env = clean_env(MLFLOW_ENV_ROOT=str(tmp_path / "envs"), **uv_sources_like_pip())
    env.pop("MLFLOW_TRACKING_URI", None)
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    for arguments in (["-e", "download", "-P", "source=synthetic", "-P", "num_studies=40",
                       "-P", "image_size=64"],
                      ["-P", "model=none", "-P", "epochs=1", "-P", "img_size=32",
                       "-P", "num_workers=0", "-P", "alias=champion"]):
        result = subprocess.run([mlflow, "run", ".", "--env-manager", "uv", *arguments],
                                cwd=clone, env=env, capture_output=True, text=True,
                                timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]

    [built] = (tmp_path / "envs").iterdir()  # one environment, shared by both runs
    python = built / "bin" / "python"
    wanted = yaml.safe_load((clone / "python_env.yaml").read_text())["dependencies"]
    versions = subprocess.run(
        [str(python), "-c", "from importlib.metadata import version as v; "
                            "print(v('torch'), v('mlflow'))"],
        cwd=tmp_path, capture_output=True, text=True, check=True).stdout.split()
    assert [f"torch=={versions[0]}", f"mlflow[auth]=={versions[1]}"] == [
        item for item in wanted if item.startswith(("torch==", "mlflow"))]
    outside = subprocess.run([str(python), "-c", "import covid_xray"], cwd=tmp_path,
                             capture_output=True, text=True)
    assert "No module named 'covid_xray'" in outside.stderr  # the project folder's copy ran

    client = MlflowClient(tracking_uri=f"sqlite:///{clone / 'mlflow.db'}")
    version = client.get_model_version_by_alias("covid-xray-densenet", "champion")
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.project.env"] == "uv"
