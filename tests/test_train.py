"""Training end to end against real MLflow stores: the embedded sqlite file and a live server."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from covid_xray.config import TrainConfig
from covid_xray.tracking.registry import logged_model_id
from covid_xray.training.run import run_training
from tests.conftest import ROOT, clean_env, free_port, no_internet

TINY = dict(model="none", img_size=32, epochs=2, patience=5, batch_size=16, num_workers=0,
            dataset_size=0, device="cpu")


@pytest.fixture
def tracking_uri(request, tmp_path, monkeypatch):
    """The tracking store for one test: 'sqlite' (the embedded default) or 'server'."""
    monkeypatch.chdir(tmp_path)  # the sqlite store and its artifacts land in the working dir
    if request.param == "server":
        uri = request.getfixturevalue("mlflow_server")
    else:
        uri = request.getfixturevalue("sqlite_store")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


@pytest.mark.parametrize("tracking_uri", ["sqlite", "server"], indirect=True)
def test_train_logs_registers_and_reloads(demo_dataset, tmp_path, tracking_uri, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")  # the run lasts seconds
    name = f"covid-xray-test-{os.getpid()}-{time.monotonic_ns()}"
    config = TrainConfig(data_dir=str(demo_dataset), cache_dir=str(tmp_path / "cache"),
                         experiment_name="e2e", registered_model_name=name, stage="Staging",
                         alias="champion", **TINY)
    outcome = run_training(config, progress=False)
    client = MlflowClient()
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "train-none-32px-s0"  # says what ran, not a seeded random name

    # Every option is a param (a folder given absolute by its name), plus the data
    # description.
    for field in dataclasses.fields(TrainConfig):
        value = str(getattr(config, field.name))
        if field.name.endswith("_dir") and value.startswith("/"):
            value = Path(value).name
        assert run.data.params[field.name] == value
    assert len(run.data.params["data_fingerprint"]) == 32
    assert int(run.data.params["count/dropped_multi_image"]) == 2
    assert int(run.data.params["count/train/negative"]) == int(run.data.params["count/train/opacity"])
    studies = sum(int(value) for key, value in run.data.params.items()
                  if key.count("/") == 2 and key.startswith("count/"))
    assert 0 < int(run.data.params["count/patients"]) < studies  # patients come back
    assert int(run.data.params["count/patients_with_several_studies"]) > 0
    assert run.data.params["count/repeated_films"] == "0"
    manifest = pd.read_csv(client.download_artifacts(outcome.run_id, "data/manifest.csv"),
                           dtype=str, keep_default_na=False)
    assert manifest.groupby("patient_id").split.nunique().max() == 1  # no patient crosses

    # Per-epoch histories for every train/val metric; final test metrics.
    for metric in ("loss", "accuracy", "auc", "f1"):
        for split in ("train", "val"):
            history = client.get_metric_history(outcome.run_id, f"{split}_{metric}")
            assert [point.step for point in history] == [1, 2]
    for metric in ("accuracy", "balanced_accuracy", "roc_auc", "precision_negative",
                   "recall_opacity", "f1_opacity"):
        assert f"test_{metric}" in run.data.metrics
    assert run.data.metrics["test_roc_auc"] == pytest.approx(outcome.test_metrics["roc_auc"])
    # System metrics (on by default): what the machine did while it trained.
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(
        run.data.metrics)
    for metric in ("roc_auc", "accuracy", "balanced_accuracy", "map", "sensitivity",
                   "specificity", "ece", "brier"):
        low, high = (run.data.metrics[f"test_{metric}_ci_{end}"] for end in ("low", "high"))
        assert 0 <= low <= high <= (2 if metric == "brier" else 1), metric
    # Calibrated on val after training: the model's temperature and threshold are logged,
    # and test calibration is reported as the model answers and as the network alone did.
    assert run.data.metrics["calibration_temperature"] == outcome.model.temperature
    assert {"test_ece_uncalibrated", "test_brier_uncalibrated", "threshold"} <= set(
        run.data.metrics)
    assert manifest.file_digest.str.fullmatch("[0-9a-f]{40}").all()
    assert manifest.pixel_digest.str.fullmatch("[0-9a-f]{32}").all()
    # MLflow 3: the test numbers are linked to the logged model, so its page shows them.
    model_id = logged_model_id(client.get_model_version(name, outcome.registered_version))
    linked = {metric.key: metric for metric in client.get_logged_model(model_id).metrics}
    assert linked["test_roc_auc"].value == pytest.approx(outcome.test_metrics["roc_auc"])
    assert linked["test_roc_auc"].dataset_name == "siim-test"  # and to the data behind them
    ranked = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id],
                                         order_by=[{"field_name": "metrics.test_roc_auc",
                                                    "ascending": False}], output_format="list")
    assert [model.model_id for model in ranked] == [model_id]

    figures = {item.path for item in client.list_artifacts(outcome.run_id, "figures")}
    assert figures == {f"figures/{name}.png" for name in
                       ("confusion_matrix", "per_class_prf1", "roc_curves", "reliability",
                        "learning_curves", "subgroups")}
    subgroups = pd.read_csv(client.download_artifacts(outcome.run_id, "subgroups.csv"))
    assert set(subgroups.attribute) == {"PatientSex", "age_band", "ViewPosition", "Manufacturer"}
    # No absolute path of this machine in the record: folders by their name.
    ours = {key: value for key, value in run.data.tags.items() if not key.startswith("mlflow.")}
    for value in [*run.data.params.values(), *ours.values(),
                  *(item.dataset.source for item in run.inputs.dataset_inputs)]:
        assert not value.startswith("/") and "/tmp/" not in value, value
    # Each split is a dataset input of its own, named and tagged by its context.
    inputs = {item.dataset.name: {tag.value for tag in item.tags if tag.key == "mlflow.data.context"}
              for item in run.inputs.dataset_inputs}
    assert inputs == {"siim-train": {"train"}, "siim-val": {"val"}, "siim-test": {"test"}}
    sizes = {item.dataset.name: json.loads(item.dataset.profile)["num_rows"]
             for item in run.inputs.dataset_inputs}
    assert sizes == {f"siim-{split}": len(manifest[manifest.split == split])
                     for split in ("train", "val", "test")}

    # Registered, tagged, staged and aliased.
    version = client.get_model_version(name, outcome.registered_version)
    assert version.current_stage == "Staging"
    assert version.tags["data_fingerprint"] == run.data.params["data_fingerprint"]
    assert len(version.tags["git_commit"]) in (40, 7) or version.tags["git_commit"] == "unknown"
    assert client.get_model_version_by_alias(name, "champion").version == version.version

    assert version.tags["git_dirty"] in ("true", "false", "unknown")

    # Its model card is the version's description (what the registry UI shows) and an
    # artifact of the run: the use it is not for, and the test AUC with its interval.
    card = version.description
    assert "**Not for diagnostic use.**" in card
    metrics = run.data.metrics
    assert (f"- roc_auc: {metrics['test_roc_auc']:.3f} (95% CI {metrics['test_roc_auc_ci_low']:.3f}"
            f"-{metrics['test_roc_auc_ci_high']:.3f})") in card
    assert f"opacity when P(opacity) >= {metrics['threshold']:.4f} (youden" in card
    logged = mlflow.artifacts.load_text(f"runs:/{outcome.run_id}/model_card.md")
    assert logged == card

    # Loading by stage and by alias gives the in-run probabilities on the test split's DICOMs
    # (read by path: the operator names the folder paths may point into).
    frame = pd.DataFrame({"path": [str(path) for path in outcome.test_paths]})
    monkeypatch.setenv("COVID_XRAY_PATH_ROOT", str(outcome.test_paths[0].parents[3]))
    for uri in (f"models:/{name}/Staging", f"models:/{name}@champion"):
        predictions = mlflow.pyfunc.load_model(uri).predict(frame)
        np.testing.assert_allclose(predictions[["prob_negative", "prob_opacity"]].to_numpy(),
                                   outcome.test_probabilities, rtol=1e-5, atol=1e-6)
        assert (predictions.error == "").all()
        # The label follows the stored threshold, not argmax; a film far from the training
        # films (over the distance threshold) keeps its probabilities but gets no label.
        threshold = run.data.metrics["threshold"]
        expected = np.where(outcome.test_probabilities[:, 1] >= threshold, "opacity",
                            "negative")
        inside = predictions.in_distribution.astype(bool).to_numpy()
        assert predictions.label.tolist() == np.where(inside, expected, "").tolist()
        assert (predictions.ood_score > run.data.metrics["ood_threshold"]).tolist() == (
            ~inside).tolist()
        assert (~inside).mean() == pytest.approx(run.data.metrics["test_ood_rate"])
    # The torch module is still there.
    torch_model = mlflow.pyfunc.load_model(f"models:/{name}@champion").unwrap_python_model().model
    assert isinstance(torch_model, torch.nn.Module)


@pytest.mark.parametrize("tracking_uri", ["sqlite"], indirect=True)
def test_four_class_run(demo_dataset, tmp_path, tracking_uri):
    config = TrainConfig(data_dir=str(demo_dataset), cache_dir=str(tmp_path / "cache"),
                         num_classes=4, registered_model_name="", split="50,25,25",
                         **TINY | {"epochs": 1})
    outcome = run_training(config, progress=False)
    assert outcome.test_probabilities.shape[1] == 4
    np.testing.assert_allclose(outcome.test_probabilities.sum(axis=1), 1, rtol=1e-5)
    assert outcome.registered_version is None
    metrics = MlflowClient().get_run(outcome.run_id).data.metrics
    for name in ("negative", "typical", "indeterminate", "atypical"):
        assert f"test_f1_{name}" in metrics
    assert set(outcome.model.class_names) == {"negative", "typical", "indeterminate", "atypical"}


@pytest.mark.parametrize("tracking_uri", ["sqlite"], indirect=True)
def test_demo_data_is_learned(demo_dataset, tmp_path, tracking_uri):
    """The synthetic opacities are learnable: a short CPU training must reach test AUC >= 0.9."""
    config = TrainConfig(data_dir=str(demo_dataset), cache_dir=str(tmp_path / "cache"),
                         registered_model_name="", **TINY | {"img_size": 64, "epochs": 8})
    outcome = run_training(config, progress=False)
    assert outcome.test_metrics["roc_auc"] >= 0.9, outcome.test_metrics


@pytest.mark.parametrize("tracking_uri", ["sqlite"], indirect=True)
def test_same_seed_same_weights_with_augmentation_and_workers(demo_dataset, tmp_path, tracking_uri):
    """albumentations ignores global seeds and DataLoader workers each hold a copy of it: both
    are seeded, so a run repeats exactly on CPU, augmentation on, with 2 workers."""
    config = TrainConfig(data_dir=str(demo_dataset), cache_dir=str(tmp_path / "cache"),
                         registered_model_name="", rotation=10, translation=0.1, hflip=True,
                         **TINY | {"num_workers": 2, "dataset_size": 120})
    first, second = run_training(config, progress=False), run_training(config, progress=False)
    np.testing.assert_array_equal(first.test_probabilities, second.test_probabilities)
    for (name, one), (_, two) in zip(first.model.state_dict().items(),
                                     second.model.state_dict().items(), strict=True):
        assert torch.equal(one, two), name
    assert first.history == second.history
    other = run_training(dataclasses.replace(config, seed=1), progress=False)
    assert not np.array_equal(first.test_probabilities[:5], other.test_probabilities[:5])


def train_cli(*args: str, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "entrypoints" / "train.py"), *args],
                          capture_output=True, text=True, timeout=600, cwd=cwd,
                          env=clean_env(**(env or {})))


def test_unreachable_server_fails_before_training(demo_dataset, tmp_path):
    result = train_cli("--data-dir", str(demo_dataset), "--model", "none",
                       "--cache-dir", str(tmp_path / "cache"),
                       env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "MLflow tracking server http://127.0.0.1:" in lines[0]
    assert "unreachable" in lines[0]
    assert not (tmp_path / "cache").exists()  # nothing was decoded


@pytest.mark.slow  # the train entry point in a fresh interpreter
def test_missing_data_dir_says_to_download(tmp_path):
    result = train_cli("--data-dir", str(tmp_path / "nothing"), "--model", "none",
                       cwd=tmp_path, env={"MLFLOW_TRACKING_URI": ""})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nothing'}: no train/ folder of DICOMs; run `mlflow run . -e "
        "download` (or `-P source=synthetic` for demo data) first"]


def runs_and_versions(db: str) -> tuple[list, list]:
    client = MlflowClient(tracking_uri=db, registry_uri=db)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return runs, client.search_model_versions()


def test_diverging_run_is_failed_and_not_registered(demo_dataset, tmp_path, sqlite_store):
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = train_cli("--data-dir", str(demo_dataset), "--cache-dir", str(tmp_path / "c"),
                       "--model", "none", "--img-size", "32", "--num-workers", "0",
                       "--optimizer", "sgd", "--lr", "1e12", "--grad-clip", "0",
                       "--epochs", "3", "--dataset-size", "60", cwd=tmp_path,
                       env={"MLFLOW_TRACKING_URI": db})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: training loss became ")
    runs, versions = runs_and_versions(db)
    assert [run.info.status for run in runs] == ["FAILED"]
    assert versions == []


def test_interrupted_run_is_killed_and_not_registered(demo_dataset, tmp_path, sqlite_store):
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "entrypoints" / "train.py"), "--data-dir",
         str(demo_dataset), "--cache-dir", str(tmp_path / "c"), "--model", "none",
         "--img-size", "32", "--num-workers", "0", "--epochs", "50", "--patience", "50",
         "--dataset-size", "60"],
        cwd=tmp_path, env=clean_env(MLFLOW_TRACKING_URI=db),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:  # wait until training is under way
        if line.startswith("epoch 1:"):
            break
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=120)
    assert process.returncode != 0
    runs, versions = runs_and_versions(db)
    assert [run.info.status for run in runs] == ["KILLED"]
    assert versions == []


def test_mlflow_run_logs_into_its_own_run(demo_dataset, tmp_path, sqlite_store):
    """`mlflow run . -e train` creates the run; the script must log there, not open another."""
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow_cli = os.path.join(os.path.dirname(sys.executable), "mlflow")
    result = subprocess.run(
        [mlflow_cli, "run", str(ROOT), "-e", "train", "--env-manager", "local",
         "--experiment-name", "via-mlflow-run",
         "-P", f"data_dir={demo_dataset}", "-P", f"cache_dir={tmp_path / 'cache'}",
         "-P", "model=none", "-P", "img_size=32", "-P", "epochs=1", "-P", "num_workers=0",
         "-P", "dataset_size=60", "-P", "registered_model_name=via-run", "-P", "hflip=true",
         "-P", "lr=1e-3"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env=clean_env(MLFLOW_TRACKING_URI=db))
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(tracking_uri=db, registry_uri=db)
    experiment = client.get_experiment_by_name("via-mlflow-run")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["model"] == "none"
    # -P values as typed (true, 1e-3) are the values the run used: no `<name>_effective` twin.
    assert (runs[0].data.params["hflip"], runs[0].data.params["lr"]) == ("true", "1e-3")
    assert not [key for key in runs[0].data.params if key.endswith("_effective")]
    assert "train_loss" in runs[0].data.metrics
    assert [str(v.version) for v in client.search_model_versions("name='via-run'")] == ["1"]


def test_missing_pretrained_weights_stop_before_data_work(demo_dataset, tmp_path):
    result = train_cli("--data-dir", str(demo_dataset), "--model", "chex",
                       "--weights-dir", str(tmp_path / "weights"),
                       "--cache-dir", str(tmp_path / "cache"), cwd=tmp_path,
                       env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
                            **no_internet()})
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: torchxrayvision weights 'chex' are not at ")
    assert "chex-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt" in error
    assert "note: torchxrayvision weights 'chex' need 224 px" in result.stdout
    assert not (tmp_path / "cache").exists()
    assert not (tmp_path / "weights" / "chex-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt").exists()


@pytest.mark.parametrize("tracking_uri", ["sqlite"], indirect=True)
def test_a_last_training_batch_of_one_film_is_dropped(demo_dataset, tmp_path, tracking_uri):
    """At 32 px a DenseNet's last feature map is 1 x 1, and BatchNorm in train mode cannot
    normalise a batch of one such map: a training split of n studies with batch_size n - 1
    must not end an epoch on a batch of one."""
    from covid_xray.training.run import prepare

    config = TrainConfig(data_dir=str(demo_dataset), cache_dir=str(tmp_path / "cache"),
                         model="none", img_size=32, epochs=1, num_workers=0, device="cpu",
                         registered_model_name="", system_metrics=False)
    studies = len(prepare(config, progress=False).loaders["train"].dataset)
    config = dataclasses.replace(config, batch_size=studies - 1)
    outcome = run_training(config, progress=False)
    assert len(outcome.history) == 1 and np.isfinite(outcome.history[0]["train_loss"])


class OpenCVThreads(torch.utils.data.Dataset):
    """Each item: how many threads OpenCV uses in the worker that loads it."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> int:
        import cv2

        return cv2.getNumThreads()


def test_training_workers_are_forkserver_children_on_one_thread(demo_dataset, tmp_path):
    """Training's loaders start workers after MLflow's threads run: forked from a clean
    server, not from this process, and each worker keeps OpenCV to one thread."""
    from torch.utils.data import DataLoader

    from covid_xray.data.dataset import init_worker
    from covid_xray.training.run import prepare

    config = TrainConfig(data_dir=str(demo_dataset), cache_dir=str(tmp_path / "cache"),
                         model="none", img_size=32, num_workers=2, device="cpu")
    loaders = prepare(config, progress=False).loaders
    assert {loader.multiprocessing_context.get_start_method() for loader in loaders.values()} == {
        "forkserver"}
    counts = DataLoader(OpenCVThreads(), batch_size=None, num_workers=2, worker_init_fn=init_worker,
                        multiprocessing_context=loaders["train"].multiprocessing_context)
    assert list(counts) == [1, 1, 1, 1]
