"""Stopping `mlflow run` stops the training: at every phase the run ends KILLED, no version is
registered, and no process is left behind. Real `mlflow run` processes, real signals."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT, clean_env


def start_mlflow_run(data_dir: Path, tmp_path: Path, pause_at: str,
                     extra: list[str] | None = None) -> subprocess.Popen:
    """`mlflow run . -e train` (+ `extra` arguments) that will pause at `pause_at`
    (lifecycle.PAUSE_VARIABLE)."""
    command = [str(Path(sys.executable).with_name("mlflow")), "run", str(ROOT), "-e", "train",
               "--env-manager", "local", "--experiment-name", "stops",
               "-P", f"data_dir={data_dir}", "-P", f"cache_dir={tmp_path / 'cache'}",
               "-P", "model=none", "-P", "img_size=32", "-P", "epochs=2",
               "-P", "num_workers=2", "-P", "dataset_size=60",
               "-P", "registered_model_name=stopped", *(extra or [])]
    return subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=clean_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
                                          COVID_XRAY_PAUSE_AT=pause_at))


def wait_for(process: subprocess.Popen, marker: str) -> str:
    seen = []
    for line in process.stdout:
        seen.append(line)
        if line.rstrip().endswith(marker):  # tqdm bars may share the line (\r)
            return "".join(seen)
    pytest.fail(f"never reached {marker!r}:\n{''.join(seen)[-3000:]}")


def our_processes(tmp_path: Path) -> list[int]:
    """Live processes whose command line names this test's folder (mlflow run, the training
    script, its cache pool and DataLoader workers all do, through their arguments or cwd)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            cwd = os.readlink(entry / "cwd")
            state = (entry / "stat").read_text().split()[2]
        except OSError:
            continue
        if state != "Z" and (str(tmp_path) in cmdline or cwd == str(tmp_path)):
            found.append(int(entry.name))
    return found


def check_stopped_cleanly(tmp_path: Path, output: str) -> None:
    deadline = time.monotonic() + 60
    while our_processes(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert our_processes(tmp_path) == [], f"processes left behind:\n{output[-2000:]}"
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=db, registry_uri=db)
    runs = client.search_runs([client.get_experiment_by_name("stops").experiment_id])
    assert [run.info.status for run in runs] == ["KILLED"], output[-2000:]
    assert client.search_model_versions("name='stopped'") == [], output[-2000:]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("phase", ["data", "cache", "epoch", "register"])
def test_sigterm_to_mlflow_run_alone_stops_the_training(demo_dataset, tmp_path, phase, sqlite_store):
    """What `kill PID`, systemd and many schedulers do: signal the `mlflow run` process only.
    Its child used to be reparented to PID 1, train on and register a version."""
    process = start_mlflow_run(demo_dataset, tmp_path, phase)
    try:
        wait_for(process, f"paused at {phase}")
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
        check_stopped_cleanly(tmp_path, output)
    finally:
        with_group_killed(process)


def test_sigterm_to_the_whole_group_like_timeout(demo_dataset, tmp_path, sqlite_store):
    """What `timeout` and Ctrl-C do: signal the process group, child included; the run that
    `mlflow run` created used to stay RUNNING forever."""
    process = start_mlflow_run(demo_dataset, tmp_path, "epoch")
    try:
        wait_for(process, "paused at epoch")
        os.killpg(process.pid, signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
        assert process.returncode != 0
        check_stopped_cleanly(tmp_path, output)
    finally:
        with_group_killed(process)


def with_group_killed(process: subprocess.Popen) -> None:
    """Whatever happened, leave nothing running for the next test."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
