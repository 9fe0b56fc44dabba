"""The README's Quickstart, as written: its `mlflow run` commands, made small (fewer, smaller
studies and one epoch) by extra -P values, leave `@champion` set in the named experiment, and
predict then works with no model_uri."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT, clean_env

pytestmark = pytest.mark.slow  # mlflow run, installs and trains

SMALLER = {"download": ["-P", "num_studies=60", "-P", "image_size=64"],
           "train": ["-P", "epochs=1", "-P", "img_size=32", "-P", "num_workers=0"]}


def quickstart_commands() -> list[list[str]]:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Quickstart"):readme.index("\n## ", readme.index(
        "## Quickstart") + 1)]
    first_block = re.search(r"```bash\n(.*?)\n```", section, re.DOTALL).group(1)
    steps = [shlex.split(step) for step in first_block.split(" && ")]
    return [step for step in steps if step[:2] == ["mlflow", "run"]]


def test_quickstart_ends_with_champion_and_predict_needs_no_uri(tmp_path):
    commands = quickstart_commands()
    assert [("-e" in c and c[c.index("-e") + 1]) or "train" for c in commands] == [
        "download", "train"]
    # The project as a user's clone holds it: `mlflow run .` runs its commands in the
    # project folder, so data/, cache/ and predictions.csv land there, not in this checkout.
    # (The package itself comes from the environment, as after the Quickstart's install.)
    clone = tmp_path / "covid-xray"
    shutil.copytree(ROOT / "entrypoints", clone / "entrypoints",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("MLproject", "python_env.yaml", "conda.yaml"):
        shutil.copy2(ROOT / name, clone / name)
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    env = clean_env()
    env.pop("MLFLOW_TRACKING_URI", None)  # the Quickstart uses the default: ./mlflow.db
    for command in commands:
        kind = command[command.index("-e") + 1] if "-e" in command else "train"
        result = subprocess.run([mlflow, *command[1:], *SMALLER[kind]], cwd=clone, env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]

    client = MlflowClient(tracking_uri=f"sqlite:///{clone / 'mlflow.db'}")
    version = client.get_model_version_by_alias("covid-xray-densenet", "champion")
    run = client.get_run(version.run_id)
    assert client.get_experiment(run.info.experiment_id).name == "covid-xray"

    result = subprocess.run([mlflow, "run", ".", "-e", "predict", "--env-manager", "local",
                             "-P", "input=data/train"], cwd=clone, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    predictions = pd.read_csv(clone / "predictions.csv", keep_default_na=False)
    assert len(predictions) > 0 and (predictions.error == "").all()
