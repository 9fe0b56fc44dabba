"""Several tune workers from one command: `mlflow run . -e tune -P workers=N`.

The command does once what N workers would race to do (create the tracking store and the
Optuna study, fill the image cache), then starts N ordinary tune workers on this machine
against the one study and waits. The workers run trials until the study has `n_trials`
(counted study-wide), each with its own sampler seed and its share of the machine: with
CUDA, worker k sees GPU k mod #GPUs; on CPU each gets cores / N torch threads. Their runs
nest under the command's run; a stop (Ctrl-C, SIGTERM) stops every worker and every run ends
KILLED.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import torch
from mlflow.tracking import MlflowClient

from covid_xray import lifecycle
from covid_xray.config import TrainConfig, TuneConfig
from covid_xray.errors import UserError
from covid_xray.tracking import mlflow_run
from covid_xray.training import tune
from covid_xray.training.run import effective_config, prepare_data

PROJECT_DIR = Path(__file__).resolve().parents[2]


def run_workers(config: TuneConfig, fixed: dict[str, Any]) -> optuna.Study:
    """Run `config.workers` worker processes on one study; log the outcome once."""
    if config.workers < 1:
        raise UserError(f"workers must be at least 1, got {config.workers}")
    if config.space:
        tune.load_space(config.space)  # a bad space is refused before any worker starts
    base = dataclasses.replace(TrainConfig(), **fixed)
    mlflow_run.check_tracking_server()
    mlflow_run.create_store_once()  # before the workers: several creating it at once collide
    study, _ = tune.open_study(config, tune.optuna_direction(config.metric))  # Optuna's tables too
    prepare_data(effective_config(base))  # the cache, filled once instead of N times over

    with mlflow_run.tracked_run(base.experiment_name,
                                run_name=f"study-{config.study_name}-x{config.workers}") as run:
        mlflow_run.log_params({"tune/workers": config.workers, "tune/n_trials": config.n_trials,
                               "tune/study_name": config.study_name})
        processes = [_start_worker(config, fixed, index, run.info.run_id)
                     for index in range(config.workers)]
        try:
            codes = [process.wait() for process in processes]
        except KeyboardInterrupt:
            _stop_workers(processes, run.info.run_id)
            raise
        tune.log_study(study, config)  # study.trials reads the storage: all workers' trials
        if config.register_best:
            tune.retrain_best(study, base, config.metric)
        failed = [index for index, code in enumerate(codes) if code != 0]
        if failed:
            raise UserError(f"worker(s) {', '.join(map(str, failed))} of {config.workers} "
                            f"failed (exit codes {[codes[i] for i in failed]}); their lines "
                            "above say why")
    return study


def _start_worker(config: TuneConfig, fixed: dict[str, Any], index: int,
                  parent_run_id: str) -> subprocess.Popen:
    """One plain tune worker: its trials, its seed, its GPU or its cores."""
    seed = config.sampler_seed if config.sampler_seed < 0 else config.sampler_seed + index
    # n_trials is the study's total: the workers stop when the study has them, together.
    worker = dataclasses.replace(config, workers=1, sampler_seed=seed, register_best=False)
    arguments = [f"--{name.replace('_', '-')}={value}" for name, value in
                 {**dataclasses.asdict(worker), **fixed}.items()]
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_RUN_ID"}
    env[tune.PARENT_RUN_VARIABLE] = parent_run_id
    # This checkout's package, also in an environment where the project is not installed (how
    # MLproject runs it under uv / virtualenv); the working folder stays the user's.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_DIR),
                                                      env.get("PYTHONPATH")]))
    if torch.cuda.is_available():
        env["CUDA_VISIBLE_DEVICES"] = str(index % torch.cuda.device_count())
    else:
        threads = str(max(1, (os.cpu_count() or 1) // config.workers))
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    return subprocess.Popen([sys.executable, "-m", "entrypoints.tune", *arguments], env=env)


def _stop_workers(processes: list[subprocess.Popen], parent_run_id: str,
                  grace: float = 30) -> None:
    """Stop every worker: SIGTERM (each ends its runs KILLED and exits), SIGKILL for any still
    there after `grace` seconds (stuck on a database lock, say), then end whatever run of
    theirs is still RUNNING, so none is left RUNNING."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    client = MlflowClient()
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    pending = [parent_run_id]
    while pending:  # the workers' runs, then their trials' runs
        children = client.search_runs([experiment_id],
                                      f"tags.mlflow.parentRunId = '{pending.pop()}'")
        for problem in lifecycle.end_if_running([child.info.run_id for child in children],
                                                "KILLED"):
            print(problem, file=sys.stderr)
        pending += [child.info.run_id for child in children]
