"""Training in several processes with torchrun (gloo on CPU): one run and one version from
rank 0, metrics over every val study once, the same numbers as a plain run for one process,
and a stop that ends every process. Real `mlflow run`, real torchrun, real signals."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from sklearn.metrics import roc_auc_score

from covid_xray.config import EvaluateConfig
from covid_xray.evaluation.calibration import OperatingPoint, fit_operating_point, fit_temperature
from covid_xray.serving.evaluate import evaluate_model
from covid_xray.tracking.registry import load
from tests.conftest import ROOT, clean_env
from tests.test_lifecycle import (
    check_stopped_cleanly,
    start_mlflow_run,
    wait_for,
    with_group_killed,
)

# Small and quick: 32 px films, two epochs, no loader workers (each process decodes its own).
TRAIN = {"model": "none", "img_size": "32", "epochs": "2", "batch_size": "8",
         "num_workers": "0", "system_metrics": "false"}


def options(**values: str) -> list[str]:
    return [item for name, value in (TRAIN | values).items()
            for item in (f"--{name.replace('_', '-')}", value)]


def test_two_processes_log_the_numbers_of_the_model_they_register(demo_dataset, tmp_path,
                                                                   monkeypatch):
    """`--nproc 2` from the user's own folder, with relative paths and the default store: two
    gloo processes, one run and one version from rank 0, every val study scored once (the
    val split has an odd size), and the numbers logged are the registered model's: its val
    loss, temperature and threshold recomputed from the val films, and every test_* metric
    recomputed by evaluate, equal to 1e-6.

    Before: the launcher ran the processes in the checkout (data, cache and mlflow.db went
    there), and each process scored its shard with its own BatchNorm statistics and weight
    average while rank 0's model was registered."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "data").symlink_to(demo_dataset)
    command = [sys.executable, "-m", "entrypoints.train", "--experiment-name", "two-processes",
               # 100 studies, class-weighted: a val split of 21, which two processes share
               # 11 + 10 (a padding sampler would score one twice).
               *options(nproc="2", data_dir="data", cache_dir="cache",
                        registered_model_name="ddp", balance="weights", dataset_size="100")]
    env = clean_env(PYTHONPATH=str(ROOT))
    result = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=900,
                            env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training in 2 processes (torchrun, gloo)" in result.stdout
    # Rank 1 prints nothing of its own: each line of the run's story appears once.
    assert result.stdout.count("calibration: temperature") == 1, result.stdout[-3000:]
    assert list((work / "cache").glob("size32-*")) and (work / "mlflow.db").is_file()

    store = f"sqlite:///{work / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("two-processes").experiment_id])
    assert [run.info.status for run in runs] == ["FINISHED"]
    run = runs[0]
    params, logged = run.data.params, run.data.metrics
    assert params["nproc"] == "2" and params["batch_size"] == "8"
    versions = client.search_model_versions("name='ddp'")
    assert [(str(v.version), v.run_id) for v in versions] == [("1", run.info.run_id)]

    manifest = pd.read_csv(client.download_artifacts(run.info.run_id, "data/manifest.csv",
                                                     str(tmp_path)))
    val, train = (manifest[manifest.split == split] for split in ("val", "train"))
    assert len(val) == sum(int(value) for key, value in params.items()
                           if key.startswith("count/val/"))
    assert len(val) % 2 == 1, len(val)
    best = int(logged["best_epoch"])
    val_losses = [m.value for m in client.get_metric_history(run.info.run_id, "val_loss")]
    val_aucs = [m.value for m in client.get_metric_history(run.info.run_id, "val_auc")]
    assert len(val_aucs) == 2

    monkeypatch.chdir(work)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("COVID_XRAY_PATH_ROOT", str(work / "data"))
    mlflow.set_tracking_uri(store)
    try:
        model = load("models:/ddp/1")
        frame = pd.DataFrame({"path": list(val.path)})
        model.set_operating_point(OperatingPoint(1.0))  # the best epoch's model, uncalibrated
        raw = model.predict(None, frame)[["prob_negative", "prob_opacity"]].to_numpy()
        temperature = fit_temperature(val.label.to_numpy(), raw)
        model.set_operating_point(OperatingPoint(temperature))
        calibrated = model.predict(None, frame)[["prob_negative", "prob_opacity"]].to_numpy()
        operating = fit_operating_point(val.label.to_numpy(), calibrated, temperature,
                                        params["operating_point"], train.label.to_numpy())
        rescored = evaluate_model(EvaluateConfig(model_uri="models:/ddp/1", cache_dir="cache",
                                                 num_workers=0), progress=False)
        evaluated = client.get_run(rescored.run_id).data.metrics
    finally:
        mlflow.set_tracking_uri(None)
    val_loss = float(-np.log(raw[np.arange(len(val)), val.label.to_numpy()]).mean())
    assert val_loss == pytest.approx(val_losses[best - 1], abs=1e-6)
    assert roc_auc_score(val.label, raw[:, 1]) == pytest.approx(val_aucs[best - 1], abs=1e-9)
    assert temperature == pytest.approx(logged["calibration_temperature"], abs=1e-6)
    assert operating.threshold == pytest.approx(logged["threshold"], abs=1e-6)
    tested = {key.removeprefix("test_"): value for key, value in logged.items()
              if key.startswith("test_")}
    assert {"roc_auc", "ece", "brier", "sensitivity"} <= tested.keys()
    for key, value in tested.items():
        assert evaluated[f"eval_{key}"] == pytest.approx(value, abs=1e-6), key


def test_one_process_under_torchrun_trains_exactly_as_a_plain_run(demo_dataset, tmp_path, sqlite_store):
    """`torchrun --nproc_per_node=1` goes through the process group, DistributedDataParallel,
    the sampler and the gathers; with the same seed every logged number equals a plain run's."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = options(data_dir=str(demo_dataset), cache_dir=str(tmp_path / "cache"),
                     registered_model_name="", dataset_size="60")
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone",
                "--nproc_per_node=1"]
    for name, launcher in (("plain", [sys.executable]), ("torchrun", torchrun)):
        result = subprocess.run([*launcher, "-m", "entrypoints.train", *common,
                                 "--experiment-name", name], cwd=ROOT, capture_output=True,
                                text=True, timeout=900, env=clean_env(MLFLOW_TRACKING_URI=store))
        assert result.returncode == 0, result.stderr[-3000:]

    client = MlflowClient(tracking_uri=store)
    plain, one = (client.search_runs([client.get_experiment_by_name(name).experiment_id])[0]
                  for name in ("plain", "torchrun"))
    assert plain.data.params["nproc"] == one.data.params["nproc"] == "1"
    assert plain.data.metrics.keys() == one.data.metrics.keys()
    assert len(plain.data.metrics) > 30  # per-epoch, test, calibration, subgroup numbers
    for key, value in plain.data.metrics.items():
        assert one.data.metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-9, nan_ok=True), key
    for key in ("train_loss", "val_loss", "val_auc"):
        histories = [[m.value for m in client.get_metric_history(run.info.run_id, key)]
                     for run in (plain, one)]
        assert histories[0] == pytest.approx(histories[1], rel=1e-6), key


def test_a_stop_ends_every_process_and_the_run_killed(demo_dataset, tmp_path, sqlite_store):
    """SIGTERM to `mlflow run -P nproc=2` mid-epoch: the launcher passes it on, rank 0 ends
    the run KILLED, nothing is registered and no process is left."""
    process = start_mlflow_run(demo_dataset, tmp_path, "epoch", extra=["-P", "nproc=2"])
    try:
        output = wait_for(process, "paused at epoch")
        assert "training in 2 processes" in output
        process.send_signal(signal.SIGTERM)
        rest, _ = process.communicate(timeout=120)
        check_stopped_cleanly(tmp_path, output + rest)
    finally:
        with_group_killed(process)


@pytest.mark.slow
def test_a_user_error_in_rank_0_is_one_line_and_stops_the_others(tmp_path):
    """Rank 0 checks and prepares first; when it refuses, the others stop quietly and the
    launcher adds nothing: one line, exit 2, no run."""
    store = tmp_path / "mlflow.db"
    result = subprocess.run(
        [sys.executable, "-m", "entrypoints.train", *options(data_dir=str(tmp_path / "none"),
                                                             nproc="2")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env=clean_env(MLFLOW_TRACKING_URI=f"sqlite:///{store}"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'none'}: no train/ folder of DICOMs; run `mlflow run . -e "
        "download` (or `-P source=synthetic` for demo data) first"], result.stderr
    assert not store.exists() or not MlflowClient(f"sqlite:///{store}").search_runs(["0"])


def _collectives(rank: int, size: int, store: str, results: str) -> None:
    """One process of `test_the_collective_steps_with_two_gloo_processes`."""
    import json

    import numpy as np
    import torch.distributed as dist

    from covid_xray.errors import UserError
    from covid_xray.training.distributed import World

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=size)
    world = World(rank=rank, size=size, grouped=True)
    items = np.arange(5) * 10  # five films: shards of 3 and 2
    mine = list(world.shard(len(items)))
    answer = {"shard": mine,
              "gathered": world.gather_shards(items[mine] + 1).tolist(),
              "concatenated": world.gather(np.array([rank, rank])).tolist(),
              "all_true": world.all_true(torch.tensor(rank == 0)),
              "agreed": world.check_same("same", "data", "fix it") is None}
    try:
        world.check_same(f"rank {rank}", "data (studies, splits or files)", "share them")
    except UserError as error:
        answer["differs"] = str(error)
    Path(results, f"{rank}.json").write_text(json.dumps(answer))
    dist.destroy_process_group()


@pytest.mark.slow
def test_the_collective_steps_with_two_gloo_processes(tmp_path):
    """World's steps in a real two-process gloo group: shards without repeats, gathered back in
    order; a flag true only on one process is not true everywhere; different data stops both."""
    import json

    import torch.multiprocessing as mp

    mp.spawn(_collectives, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    answers = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    assert [a["shard"] for a in answers] == [[0, 2, 4], [1, 3]]
    assert all(a["gathered"] == [1, 11, 21, 31, 41] for a in answers)
    assert all(a["concatenated"] == [0, 0, 1, 1] for a in answers)
    assert [a["all_true"] for a in answers] == [False, False]
    assert all(a["agreed"] for a in answers)
    assert all(a["differs"] == "process 1 of 2 sees other data (studies, splits or files) than "
               "process 0; share them" for a in answers)


@pytest.mark.slow
def test_nproc_below_one_is_refused(tmp_path):
    result = subprocess.run([sys.executable, "-m", "entrypoints.train", "--nproc", "0"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=clean_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'm.db'}"))
    assert result.returncode == 2
    assert result.stderr.strip() == "error: nproc must be 1 or more, got 0"


def _loses_its_peer(rank: int, port: int, results: str) -> None:
    """One process of `test_a_lost_process_is_one_line_in_the_others`."""
    import os
    import time

    import numpy as np

    from covid_xray.errors import UserError
    from covid_xray.training.distributed import joined

    os.environ |= {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    try:
        with joined(torch.device("cpu")) as world:
            world.gather(np.array([rank]))  # both alive
            if rank == 1:
                os._exit(9)  # killed: no goodbye to the group
            time.sleep(1)
            world.gather(np.array([rank]))
    except UserError as error:
        Path(results, f"{rank}.txt").write_text(str(error))


@pytest.mark.slow
def test_a_lost_process_is_one_line_in_the_others(tmp_path):
    """A process of the group dies (kill -9, out of memory): the survivor's next collective
    failed with 40 lines of gloo traceback before the one-line error. Now it is one line
    naming the survivor, and the dead one's output is where the reason is."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    processes = [context.Process(target=_loses_its_peer, args=(rank, port, str(tmp_path)))
                 for rank in (0, 1)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
    assert [process.exitcode for process in processes] == [0, 9]
    said = (tmp_path / "0.txt").read_text()
    assert "\n" not in said and said.startswith(
        "process 0 of 2: another training process stopped (Connection closed by peer"), said
    assert said.endswith("its own output says why, and every process stops")


@pytest.mark.slow
@pytest.mark.parametrize("nproc", ["1", "2"])
def test_a_batch_of_one_is_refused_in_one_line(nproc, tmp_path):
    """batch_size=1 raised BatchNorm's ValueError mid-epoch, in every process."""
    result = subprocess.run([sys.executable, "-m", "entrypoints.train", "--batch-size", "1",
                             "--nproc", nproc, "--data-dir", str(tmp_path / "none")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=clean_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'db'}"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: batch_size must be 2 or more, got 1: BatchNorm normalises each step by its "
        "batch's statistics, and one film has no spread; use 2 or more (the default is 32)"]
