"""Training in several processes with torchrun (gloo on CPU): one run and one version from
rank 0, metrics over every val study once, the same numbers as a plain run for one process,
and a stop that ends every process. Real `mlflow run`, real torchrun, real signals."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from sklearn.metrics import roc_auc_score

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


def test_two_processes_make_one_run_one_version_scored_on_every_val_study(
        demo_dataset, tmp_path, mlflow_server):
    """`mlflow run -P nproc=2`: two gloo processes, rank 0 alone logs and registers, and the
    val AUC it logged is the AUC of the registered model over every val study (not over one
    process's half, and with no study counted twice: the val split has an odd size)."""
    command = [str(Path(sys.executable).with_name("mlflow")), "run", str(ROOT), "-e", "train",
               "--env-manager", "local", "--experiment-name", "two-processes",
               "-P", "nproc=2", "-P", f"data_dir={demo_dataset}",
               "-P", f"cache_dir={tmp_path / 'cache'}", "-P", "registered_model_name=ddp",
               # 100 studies, class-weighted: a val split of 21, which two processes share
               # 11 + 10 (a padding sampler would score one twice).
               "-P", "balance=weights", "-P", "dataset_size=100",
               *[item for name, value in TRAIN.items() for item in ("-P", f"{name}={value}")]]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900,
                            env=clean_env(MLFLOW_TRACKING_URI=mlflow_server))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training in 2 processes (torchrun, gloo)" in result.stdout
    # Rank 1 prints nothing of its own: each line of the run's story appears once.
    assert result.stdout.count("calibration: temperature") == 1, result.stdout[-3000:]

    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("two-processes").experiment_id])
    assert [run.info.status for run in runs] == ["FINISHED"]
    run = runs[0]
    assert run.data.params["nproc"] == "2" and run.data.params["batch_size"] == "8"
    versions = client.search_model_versions("name='ddp'")
    assert [(v.version, v.run_id) for v in versions] == [("1", run.info.run_id)]

    manifest = pd.read_csv(client.download_artifacts(run.info.run_id, "data/manifest.csv",
                                                     str(tmp_path)))
    val = manifest[manifest.split == "val"]
    logged_count = sum(int(value) for key, value in run.data.params.items()
                       if key.startswith("count/val/"))
    assert len(val) == logged_count and len(val) % 2 == 1, len(val)
    best = int(run.data.metrics["best_epoch"])
    logged = [m.value for m in client.get_metric_history(run.info.run_id, "val_auc")]
    assert len(logged) == 2

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        patch.setenv("COVID_XRAY_PATH_ROOT", str(demo_dataset))
        mlflow.set_tracking_uri(mlflow_server)
        try:
            answers = load("models:/ddp/1").predict(
                None, pd.DataFrame({"path": [str(demo_dataset / p) for p in val.path]}))
        finally:
            mlflow.set_tracking_uri(None)
    assert (answers.error == "").all()
    # The registered model is the best epoch's weights, calibrated by a temperature, which
    # keeps the ranking: its AUC over the val studies is the one logged for that epoch.
    assert roc_auc_score(val.label, answers.prob_opacity) == pytest.approx(logged[best - 1],
                                                                           abs=1e-9)


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
