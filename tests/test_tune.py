"""Optuna studies: nested runs, parallel workers on one study (sqlite and PostgreSQL), resume
after a killed worker, and clear errors.

Three ways in, cheapest first: Optuna's side (the study-wide cap, failure counting) with a
trivial objective on real sqlite and PostgreSQL storage; studies whose trials train, through
`run_study` in this process; and real worker processes end to end (`mlflow run -e tune`, two
workers on PostgreSQL, `-P workers=2`, a killed worker, Ctrl-C)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import optuna
import pytest
from mlflow.tracking import MlflowClient

from covid_xray.cli import given_values
from covid_xray.config import DEFAULT_SPACE, TrainConfig, TuneConfig
from covid_xray.errors import UserError
from covid_xray.training.tune import (
    COUNTED,
    CappedStorage,
    check_space,
    load_space,
    open_study,
    optuna_direction,
    run_study,
    run_trials,
    suggest,
)
from tests.conftest import ROOT, clean_env

# Small and quiet: 60 studies at 32 px, and no system-metrics thread writing to the shared
# sqlite store while several workers do (the train tests cover system metrics).
TINY = {"model": "none", "img_size": 32, "epochs": 2, "num_workers": 0, "batch_size": 16,
        "device": "cpu", "system_metrics": False, "dataset_size": 60}


def tune_worker(tmp_path, data_dir, *args: str, env: dict | None = None, **popen) -> subprocess.Popen:
    """A tune worker process, as `python -m entrypoints.tune` starts one."""
    tiny = [item for name, value in TINY.items()
            for item in (f"--{name.replace('_', '-')}", str(value).lower())]
    command = [sys.executable, str(ROOT / "entrypoints" / "tune.py"), "--data-dir", str(data_dir),
               "--cache-dir", str(tmp_path / "cache"), *tiny, *args]
    env = clean_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", **(env or {}))
    return subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def finish(worker: subprocess.Popen) -> tuple[str, str]:
    out, err = worker.communicate(timeout=600)
    assert worker.returncode == 0, err[-3000:]
    return out, err


@pytest.fixture
def here(tmp_path, monkeypatch):
    """This test's folder as the working folder, with its own tracking store (not made yet)
    in it, as a tune command started there would have."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield tmp_path
    mlflow.set_tracking_uri(None)


def tune(data_dir, tmp_path, fixed: dict | None = None, **options) -> optuna.Study:
    """`run_study` in this process, as the tune entry point calls it (the study in optuna.db
    beside the tracking store)."""
    fixed = TINY | {"data_dir": str(data_dir), "cache_dir": str(tmp_path / "cache")} | (
        fixed or {})
    return run_study(TuneConfig(**options), fixed)


def runs_of(tmp_path, experiment: str = "covid-xray") -> list:
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=db)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


def check_one_run_per_trial(runs: list, study: optuna.Study) -> None:
    children = [run for run in runs if run.data.tags["mlflow.runName"].startswith("trial-")]
    numbers = sorted(int(run.data.tags["optuna_trial"]) for run in children)
    assert numbers == sorted(trial.number for trial in study.trials)
    assert len(set(numbers)) == len(numbers)
    assert not [run for run in runs if run.info.status == "RUNNING"]


# --- Optuna's side: a trivial objective on real storage ----------------------------------


def draw(trial: optuna.Trial) -> float:
    """A trial of the default search space that trains nothing."""
    values = suggest(trial, DEFAULT_SPACE)
    return values["lr"] * 100 + values["drop_rate"]


def a_worker(storage: str, study_name: str, n_trials: int, objective=draw,
             seeds: list[int] | None = None, **options) -> tuple[optuna.Study, list[int]]:
    """One tune worker's study loop on `storage`, as run_study runs it (CappedStorage, this
    worker's sampler seed, appended to `seeds`, and run_trials): the trials it started."""
    config = TuneConfig(n_trials=n_trials, study_name=study_name, storage=storage, **options)
    study, seed = open_study(config, optuna_direction(config.metric))
    (seeds if seeds is not None else []).append(seed)
    tally = run_trials(study, objective, config)
    tally.check()
    return study, tally.started


def test_n_trials_is_the_studys_total_across_workers(tmp_path, capsys):
    """n_trials is the study's: the second worker adds what the first left, no more, and a
    worker joining a finished study starts nothing."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    a_worker(storage, "shared", 2, sampler_seed=1)
    study, started = a_worker(storage, "shared", 3, sampler_seed=2)
    assert started == [2]
    assert sorted(trial.number for trial in study.trials) == [0, 1, 2]
    capsys.readouterr()
    _, started = a_worker(storage, "shared", 3)
    assert started == []
    assert "study shared has its 3 trials; this worker ran 0 of them" in capsys.readouterr().out
    assert len(optuna.load_study(study_name="shared", storage=storage).trials) == 3


@pytest.mark.parametrize("database", ["sqlite", pytest.param(
    "postgresql", marks=[pytest.mark.slow, pytest.mark.xdist_group("postgres")])])
def test_workers_started_together_run_exactly_n_trials_all_different(database, tmp_path,
                                                                     request):
    """Three workers, default seeds, one study, n_trials=6: exactly 6 trials between them (the
    study's total, counted and created under a lock: a file lock on sqlite, an advisory lock
    on PostgreSQL), all different configurations (TPE's first trials are random draws from
    each worker's seed; equal seeds meant the same configuration three times). Every worker
    holds its first trial until all three have one, so each takes part."""
    storage = (f"sqlite:///{tmp_path / 'optuna.db'}" if database == "sqlite"
               else request.getfixturevalue("postgres"))
    name = f"together-{tmp_path.name}"
    everyone_started = threading.Barrier(3, timeout=120)
    seen = threading.local()

    def objective(trial: optuna.Trial) -> float:
        if not getattr(seen, "first", False):
            seen.first = True
            everyone_started.wait()
        return draw(trial)

    started: dict[int, list[int]] = {}
    errors: list[BaseException] = []
    seeds: list[int] = []

    def worker(index: int) -> None:
        try:
            started[index] = a_worker(storage, name, 6, objective, seeds)[1]
        except BaseException as error:  # seen by the test below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    assert len(set(seeds)) == 3  # default seeds: a fresh one per worker
    study = optuna.load_study(study_name=name, storage=storage)
    assert sorted(trial.number for trial in study.trials) == [0, 1, 2, 3, 4, 5]
    assert {trial.state.name for trial in study.trials} == {"COMPLETE"}
    assert len({tuple(sorted(trial.params.items())) for trial in study.trials}) == 6
    assert sum(len(numbers) for numbers in started.values()) == 6
    assert all(started.values()), started  # every worker ran some


@pytest.mark.parametrize("locked", [True, False], ids=["with the lock", "lock removed"])
def test_workers_released_together_inside_trial_creation_never_overshoot(locked, tmp_path,
                                                                          monkeypatch):
    """The race, forced: three workers of a study with n_trials=2 enter trial creation at
    the same instant (a barrier just before the lock), and each pauses between counting the
    trials and creating its own (the window a race needs). With the lock exactly 2 trials are
    made and one worker starts none; with the lock removed the same race makes 3: the test can
    fail, and the lock is what passes it."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    arrived = threading.Barrier(3, timeout=120)
    first = threading.local()
    one_at_a_time = CappedStorage._one_at_a_time
    counted = CappedStorage.get_all_trials

    @contextlib.contextmanager
    def together_then_locked(self):
        if not getattr(first, "done", False):
            first.done = True
            arrived.wait()  # every worker at the door at once
        with (one_at_a_time(self) if locked else contextlib.nullcontext()):
            yield

    def slow_count(self, *args, **kwargs):
        trials = counted(self, *args, **kwargs)
        if kwargs.get("states") == COUNTED:
            time.sleep(0.3)  # counted, not yet created: the others may count now
        return trials

    monkeypatch.setattr(CappedStorage, "_one_at_a_time", together_then_locked)
    monkeypatch.setattr(CappedStorage, "get_all_trials", slow_count)
    study = optuna.create_study(study_name="race", storage=storage)  # made before the race
    started: list[list[int]] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            started.append(a_worker(storage, "race", 2)[1])
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    made = len(optuna.load_study(study_name=study.study_name, storage=storage).trials)
    if locked:
        assert made == 2 and sorted(map(len, started)) == [0, 1, 1], started
    else:
        assert made == 3, made  # the race is real: without the lock, n_trials is overshot


def test_a_failing_trial_is_that_trials_and_the_worker_goes_on(tmp_path, capsys):
    """A trial that raises (CUDA out of memory, say) is FAIL in the study; the worker goes on
    and is not failed while another trial completed. A worker whose every trial failed is."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"

    def first_fails(trial: optuna.Trial) -> float:
        if trial.number == 0:
            raise RuntimeError("out of memory")
        return draw(trial)

    study, started = a_worker(storage, "flaky", 2, first_fails)
    assert started == [0, 1]
    assert [trial.state.name for trial in study.trials] == ["FAIL", "COMPLETE"]
    assert "trial 0 failed: RuntimeError: out of memory" in capsys.readouterr().out

    def always_fails(trial: optuna.Trial) -> float:
        raise RuntimeError("no GPU")

    with pytest.raises(UserError, match=r"^all 3 trials of this worker failed; first: trial 2: "
                                        r"RuntimeError: no GPU$"):
        a_worker(storage, "flaky", 3, always_fails)


# --- studies whose trials train, in this process ------------------------------------------


def test_three_trial_study_nested_runs(demo_dataset, here, capsys):
    space = here / "space.yaml"
    space.write_text("lr: {type: float, low: 0.0001, high: 0.003, log: true}\n"
                     "optimizer: {type: categorical, choices: [adam, sgd]}\n"
                     "normalization: {type: categorical, choices: [minmax, clahe]}\n")
    tune(demo_dataset, here, n_trials=3, space=str(space), study_name="three",
         register_best=True)
    out = capsys.readouterr().out
    study = optuna.load_study(study_name="three", storage=f"sqlite:///{here / 'optuna.db'}")
    assert len(study.trials) == 3
    runs = runs_of(here)
    parents = [run for run in runs if run.data.tags.get("mlflow.runName") == "study-three"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    client = MlflowClient(tracking_uri=f"sqlite:///{here / 'mlflow.db'}")
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    trials = [run for run in children if run.data.tags["mlflow.runName"].startswith("trial-")]
    assert sorted(run.data.tags["mlflow.runName"] for run in trials) == ["trial-0", "trial-1", "trial-2"]
    for run in trials:
        assert run.info.status in ("FINISHED", "KILLED")  # KILLED = pruned
        assert run.data.tags["trial_state"] in ("COMPLETE", "PRUNED")
        assert run.data.params["optimizer"] in ("adam", "sgd")
        assert run.data.params["model"] == "none" and run.data.params["img_size"] == "32"
        assert "val_auc" in run.data.metrics
        # Validation only: a trial never sees the test split and logs no model.
        assert not [key for key in run.data.metrics if key.startswith("test_")]
        assert client.search_logged_models([run.info.experiment_id], filter_string=(
            f"source_run_id = '{run.info.run_id}'")) == []
        if run.data.tags["trial_state"] == "COMPLETE":  # a pruned one stopped mid-fit
            assert "figures/learning_curves.png" in {
                item.path for item in client.list_artifacts(run.info.run_id, "figures")}
    # The parent carries the study's best and Optuna's pictures.
    assert parent.data.metrics["best_val_auc"] == pytest.approx(study.best_value)
    assert parent.data.params["best/lr"] == str(study.best_params["lr"])
    assert parent.data.params["fixed/model"] == "none"
    figures = {item.path for item in client.list_artifacts(parent.info.run_id, "figures")}
    assert {"figures/optuna_optimization_history.png",
            "figures/optuna_parallel_coordinate.png"} <= figures
    # register_best retrained the best configuration and registered it.
    retrain = [run for run in children if run.data.tags["mlflow.runName"] == "best-retrain"]
    assert len(retrain) == 1 and retrain[0].data.params["lr"] == str(study.best_params["lr"])
    assert retrain[0].data.params["seed"] == str(study.best_trial.user_attrs["train_config"]["seed"])
    assert "test_roc_auc" in retrain[0].data.metrics  # the retrained model is tested, once
    assert "registered covid-xray-densenet version 1" in out
    # It reproduces the best trial's validation metric exactly (CPU runs are deterministic).
    best_epoch = int(retrain[0].data.metrics["best_epoch"])
    history = client.get_metric_history(retrain[0].info.run_id, "val_auc")
    assert [point.value for point in history if point.step == best_epoch] == [study.best_value]
    assert parent.data.metrics["best_retrain_val_auc"] == study.best_value
    assert " reproduced; registered" in out


def test_nan_objective_fails_the_trial_in_optuna_and_mlflow_alike(demo_dataset, here):
    """4 classes, a 3% validation split: it lacks the rarest class, so val_auc is NaN."""
    with pytest.raises(UserError) as raised:
        tune(demo_dataset, here, {"num_classes": 4, "split": "94,3,3", "epochs": 1,
                                  "dataset_size": 0}, n_trials=1, study_name="nan")
    # A worker whose every trial failed is not a success (the entry point exits 2 with it).
    assert str(raised.value) == (
        "all 1 trials of this worker failed; first: trial 0: val_auc is NaN (a validation "
        "split without both classes?); use more studies")
    study = optuna.load_study(study_name="nan", storage=f"sqlite:///{here / 'optuna.db'}")
    assert [trial.state.name for trial in study.trials] == ["FAIL"]
    (trial_run,) = [run for run in runs_of(here) if run.data.tags["mlflow.runName"] == "trial-0"]
    assert trial_run.data.tags["trial_state"] == "FAIL"


def test_the_median_pruner_stops_a_trial_worse_than_the_studys_median(demo_dataset, here):
    """A real pruning decision: two finished trials whose val loss was 0 at every epoch make
    the median 0, so Optuna's MedianPruner must stop any real trial at its first report; the
    trial is PRUNED in the study and its run KILLED, tagged PRUNED."""
    storage = f"sqlite:///{here / 'optuna.db'}"
    study = optuna.create_study(study_name="pruning", storage=storage, direction="minimize")
    for _ in range(2):
        study.add_trial(optuna.trial.create_trial(
            params={}, distributions={}, value=0.0, intermediate_values={1: 0.0, 2: 0.0,
                                                                         3: 0.0}))
    space = here / "space.yaml"
    space.write_text("label_smoothing: {type: float, low: 0.0, high: 0.1}\n")
    tune(demo_dataset, here, {"epochs": 3}, n_trials=3, metric="val_loss", space=str(space),
         study_name="pruning", storage=storage)
    trial = optuna.load_study(study_name="pruning", storage=storage).trials[-1]
    assert trial.state == optuna.trial.TrialState.PRUNED
    # Epochs are steps 1, 2, ...; MedianPruner(n_warmup_steps=1) may prune from step 1 on
    # (it skips steps < 1), so the first report already stops the trial: one epoch of three.
    assert sorted(trial.intermediate_values) == [1]
    (run,) = [run for run in runs_of(here) if run.data.tags.get("mlflow.runName")
              == f"trial-{trial.number}"]
    assert run.info.status == "KILLED" and run.data.tags["trial_state"] == "PRUNED"


def test_orphan_cleanup_survives_an_unknown_run(sqlite_store, monkeypatch, capsys):
    """The worker that notices a lost trial may not know its runs (another tracking store),
    or the server may blink: one line, and the study carries on."""
    from covid_xray.training.tune import _end_orphaned_runs

    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_store)
    mlflow.set_tracking_uri(sqlite_store)
    trial = optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, params={},
                                      distributions={}, user_attrs={
                                          "mlflow_run_id": "0123456789abcdef0123456789abcdef"})
    _end_orphaned_runs(None, trial)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (f"trial {trial.number}: could not end MLflow run "
                      "0123456789abcdef0123456789abcdef as KILLED (Run with id="
                      "0123456789abcdef0123456789abcdef not found); carrying on")
    mlflow.set_tracking_uri(None)


def test_pruned_runs_end_killed(sqlite_store, monkeypatch):
    """A pruning decision ends the trial's run KILLED (tagged PRUNED by tune), not FAILED."""
    from covid_xray.tracking.mlflow_run import tracked_run
    from covid_xray.training.tune import TrialPruned

    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_store)
    mlflow.set_tracking_uri(sqlite_store)
    with pytest.raises(optuna.TrialPruned), tracked_run("prune") as run:
        raise TrialPruned("pruned at epoch 1")
    assert MlflowClient().get_run(run.info.run_id).info.status == "KILLED"
    mlflow.set_tracking_uri(None)


# --- refusals: one line each, before any trial ----------------------------------------------


@pytest.mark.parametrize(("options", "message"), [
    ({"storage": "not a url"}, "storage 'not a url' is not a database URL"),
    ({"storage": "postgresql://u:hunter2@127.0.0.1:1/db"},
     "storage must not contain a password"),
    ({"storage": "postgresql://u@127.0.0.1:1/db"},
     "cannot open Optuna storage postgresql://u@127.0.0.1:1/db: "),
])
def test_bad_tune_input_is_one_line(demo_dataset, here, capsys, options, message):
    with pytest.raises(UserError) as raised:
        tune(demo_dataset, here, n_trials=1, **options)
    lines = str(raised.value).splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), raised.value
    assert "hunter2" not in str(raised.value) + str(capsys.readouterr())


def test_a_train_option_of_the_wrong_type_is_one_line():
    with pytest.raises(UserError, match=r"^lr: 'fast' is not a valid float\.$"):
        given_values(TrainConfig, {"lr": "fast"})


def test_a_password_in_storage_given_to_mlflow_run_is_not_kept(demo_dataset, here,
                                                               sqlite_store, monkeypatch):
    """`mlflow run -P storage=postgresql://u:password@...` logs the URL as a param and hands
    the run to the command (MLFLOW_RUN_ID) before the project sees it: the refusal deletes
    that run (MLflow cannot delete one param) and says how to purge it and where the URL
    belongs instead."""
    client = MlflowClient(tracking_uri=sqlite_store)
    experiment = client.create_experiment("secrets")
    started = client.create_run(experiment)  # what `mlflow run` does first
    secret = "postgresql://u:hunter2@127.0.0.1:1/db"
    client.log_param(started.info.run_id, "storage", secret)
    monkeypatch.setenv("MLFLOW_RUN_ID", started.info.run_id)
    with pytest.raises(UserError) as raised:
        tune(demo_dataset, here, n_trials=1, storage=secret)
    assert client.search_runs([experiment]) == []  # nothing left to see
    [run] = client.search_runs([experiment], run_view_type=mlflow.entities.ViewType.DELETED_ONLY)
    assert run.info.status == "FAILED"
    assert str(raised.value) == (
        "storage must not contain a password (mlflow run logs parameters); pass the "
        "whole URL in the OPTUNA_STORAGE environment variable, or put the password in "
        f"PGPASSWORD or ~/.pgpass; run {run.info.run_id}, which `mlflow run` logged it in, is "
        f"deleted: `mlflow gc --run-ids {run.info.run_id}` on the tracking store removes it "
        "for good")


def test_unknown_search_space_parameter(demo_dataset, here):
    space = here / "space.json"
    space.write_text('{"lr": {"type": "float", "low": 0.001, "high": 0.01}, '
                     '"learning_rate": {"type": "float", "low": 0.1, "high": 1}}')
    with pytest.raises(UserError) as raised:
        tune(demo_dataset, here, space=str(space))
    message = str(raised.value)
    assert message.splitlines() == [
        f"{space}: unknown search-space parameter 'learning_rate'; train parameters are "
        + message.split("train parameters are ")[1].strip()]
    assert not (here / "mlflow.db").exists() or not runs_of(here)


@pytest.mark.parametrize(("space", "message"), [
    ("lr: {type: float, low: 0.01, high: 0.001}", "lr has low 0.01 above high 0.001"),
    ("lr: {type: float, low: 0, high: 0.1, log: true}",
     "lr is searched on a log scale, so low must be above 0, got 0"),
    ("epochs: {type: int, low: 1, high: 2.5}", "epochs low and high must be ints"),
    ("optimizer: {type: categorical, choices: [lamb]}",
     "optimizer choice 'lamb' is not one of adamw, adam, sgd, rmsprop"),
    ("hflip: {type: categorical, choices: [yes, 1]}", "hflip choice 1 is not a bool"),
    ("batch_size: {type: categorical, choices: [16, '32']}", "batch_size choice '32' is not a int"),
    ("batch_size: {type: categorical, choices: []}", "batch_size choices must be a non-empty list"),
])
def test_a_space_trials_would_fail_on_is_refused_up_front(tmp_path, space, message):
    (tmp_path / "space.yaml").write_text(space + "\n")
    with pytest.raises(UserError, match=f"^{tmp_path / 'space.yaml'}: {re.escape(message)}"):
        load_space(str(tmp_path / "space.yaml"))


def test_the_default_space_is_valid():
    check_space(DEFAULT_SPACE)


def test_impossible_choice_fails_before_any_trial(demo_dataset, here):
    space = here / "space.yaml"
    space.write_text("optimizer: {type: categorical, choices: [lamb]}\n")
    with pytest.raises(UserError) as raised:
        tune(demo_dataset, here, space=str(space))
    assert str(raised.value).splitlines() == [
        f"{space}: optimizer choice 'lamb' is not one of adamw, adam, sgd, rmsprop"]
    assert not (here / "optuna.db").exists()


# --- real worker processes, end to end ------------------------------------------------------


def test_mlflow_run_tune_takes_the_train_options_given(demo_dataset, tmp_path, sqlite_store):
    """tune declares only its own options in MLproject; `-P lr=...` reaches it as `--lr ...`
    (MLflow passes undeclared parameters on), and only the options given are fixed."""
    space = tmp_path / "space.yaml"
    space.write_text("label_smoothing: {type: float, low: 0.0, high: 0.2}\n")
    given = {"data_dir": demo_dataset, "cache_dir": tmp_path / "cache", "model": "none",
             "img_size": 32, "epochs": 1, "num_workers": 0, "batch_size": 16,
             "dataset_size": 60, "system_metrics": "false", "lr": 0.002}
    command = [str(Path(sys.executable).with_name("mlflow")), "run", str(ROOT), "-e", "tune",
               "--env-manager", "local", "-P", "n_trials=1", "-P", f"space={space}",
               *(f"-P{name}={value}" for name, value in given.items())]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env=clean_env(MLFLOW_TRACKING_URI=sqlite_store))
    assert result.returncode == 0, result.stderr[-3000:]
    trials = [run for run in runs_of(tmp_path, "Default") + runs_of(tmp_path)
              if run.data.tags.get("mlflow.runName", "").startswith("trial-")]
    assert len(trials) == 1
    params = trials[0].data.params
    assert params["lr"] == "0.002" and params["img_size"] == "32"
    assert 0.0 <= float(params["label_smoothing"]) <= 0.2
    assert params["optimizer"] == "adamw"  # not given, not searched: train's default


def test_two_workers_share_a_postgresql_study(demo_dataset, tmp_path, sqlite_store, postgres):
    """Two worker processes, one PostgreSQL study: n_trials between them, one nested run per
    trial, and the password (given in the environment) in no record and no output."""
    # The password comes through the environment, never a -P value (mlflow run logs those);
    # trust authentication accepts any, so this checks it is kept out of every record.
    secret_url = postgres.replace("postgres@", "postgres:s3cret-pw@")
    study_name = f"pg-{tmp_path.name}"
    workers = [tune_worker(tmp_path, demo_dataset, "--n-trials", "2", "--study-name",
                           study_name, "--epochs", "1", "--sampler-seed", str(seed),
                           env={"OPTUNA_STORAGE": secret_url})
               for seed in (1, 2)]
    outputs = [finish(worker) for worker in workers]
    study = optuna.load_study(study_name=study_name, storage=postgres)
    assert sorted(trial.number for trial in study.trials) == [0, 1]
    runs = runs_of(tmp_path)
    check_one_run_per_trial(runs, study)
    for run in runs:
        assert "s3cret" not in str(run.data.params) + str(run.data.tags)
    assert all("s3cret" not in out + err for out, err in outputs)
    parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    assert {run.data.params["tune/storage"] for run in parents} == {
        postgres.replace("postgres@", "postgres:***@")}


def test_a_killed_worker_leaves_exactly_n_trials_and_nothing_running(demo_dataset, tmp_path,
                                                                      sqlite_store):
    """kill -9 of a worker mid-trial, every setting at its default (heartbeat 30 s, so 90 s
    of grace): the other worker of the study used to count the dead trial among n_trials and
    exit, leaving it and its runs RUNNING and the study one trial short. Now it waits out the
    grace period, fails the lost trial (its runs KILLED), runs its configuration again, and
    the study ends with exactly n_trials complete and nothing RUNNING."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    doomed = tune_worker(tmp_path, demo_dataset, "--n-trials", "2", "--study-name", "lost",
                         "--epochs", "200", "--patience", "200")
    deadline = time.monotonic() + 300
    while True:  # wait until its trial is running and has its MLflow run
        time.sleep(1)
        try:
            trials = optuna.load_study(study_name="lost", storage=storage).trials
        except KeyError:
            trials = []
        if any("mlflow_run_id" in t.user_attrs for t in trials):
            break
        assert doomed.poll() is None and time.monotonic() < deadline, doomed.communicate()
    doomed.send_signal(signal.SIGKILL)  # no chance to clean up: the hard case
    doomed.communicate()

    out, _ = finish(tune_worker(tmp_path, demo_dataset, "--n-trials", "2", "--study-name",
                                "lost", "--epochs", "1"))
    assert "trial 0 lost its worker: marked FAIL, its MLflow runs KILLED" in out
    study = optuna.load_study(study_name="lost", storage=storage)
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") == 2 and states.count("FAIL") == 1, states
    assert "RUNNING" not in states
    # The lost configuration is not dropped: it was queued again, once, and ran.
    lost = study.trials[0]
    (retry,) = [t for t in study.trials if t.system_attrs.get("failed_trial") == 0]
    assert retry.params == lost.params and retry.state.name == "COMPLETE"
    runs = runs_of(tmp_path)
    assert not [run for run in runs if run.info.status == "RUNNING"]
    killed = {run.data.tags.get("mlflow.runName"): run.info.status for run in runs
              if run.info.status == "KILLED"}
    assert killed == {"trial-0": "KILLED", "study-lost": "KILLED"}
    (retry_run,) = [run for run in runs
                    if run.data.tags.get("mlflow.runName") == f"trial-{retry.number}"]
    assert retry_run.data.tags["optuna_retry_of"] == "0" and retry_run.info.status == "FINISHED"


def test_workers_from_one_command(demo_dataset, tmp_path, sqlite_store):
    """-P workers=2: n_trials counts the study's trials; one nested run per trial, under
    one run per worker, under the command's run; nothing left RUNNING. Started as `mlflow run
    --experiment-name team` starts it (the run made in `team`, its id in MLFLOW_RUN_ID), every
    run lands in `team`, and no other experiment is created."""
    client = MlflowClient(tracking_uri=sqlite_store)
    team = client.create_experiment("team")
    started = client.create_run(team, run_name="as-mlflow-run-made-it")
    finish(tune_worker(tmp_path, demo_dataset, "--n-trials", "3", "--workers", "2",
                       "--study-name", "pair", "--epochs", "1",
                       env={"MLFLOW_RUN_ID": started.info.run_id, "MLFLOW_EXPERIMENT_ID": team}))
    study = optuna.load_study(study_name="pair", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert len(study.trials) == 3
    assert sorted(e.name for e in client.search_experiments()) == ["Default", "team"]
    runs = runs_of(tmp_path, "team")
    check_one_run_per_trial(runs, study)
    by_id = {run.info.run_id: run for run in runs}
    (command,) = [run for run in runs if run.info.run_id == started.info.run_id]
    workers = [run for run in runs if run.data.tags["mlflow.runName"] == "study-pair"]
    assert len(workers) == 2
    assert {run.data.tags["mlflow.parentRunId"] for run in workers} == {command.info.run_id}
    for trial in (run for run in runs if run.data.tags["mlflow.runName"].startswith("trial-")):
        assert by_id[trial.data.tags["mlflow.parentRunId"]] in workers
    assert [int(run.data.params["tune/n_trials"]) for run in workers] == [3, 3]  # the study's
    assert command.data.metrics["best_val_auc"] == pytest.approx(study.best_value)
    assert len({run.data.params["tune/sampler_seed_used"] for run in workers}) == 2


def test_ctrl_c_stops_every_worker(demo_dataset, tmp_path, sqlite_store):
    # As from a terminal: a process started in the background (CI's, say) inherits SIGINT
    # ignored, and Python then keeps ignoring it; a foreground command has the default.
    worker = tune_worker(tmp_path, demo_dataset, "--n-trials", "2", "--workers", "2",
                         "--study-name", "stop", env={"COVID_XRAY_PAUSE_AT": "epoch"},
                         start_new_session=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    paused = 0
    for line in worker.stdout:
        paused += line.rstrip().endswith("paused at epoch")
        if paused == 2:
            break
    os.killpg(worker.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends
    out, err = worker.communicate(timeout=240)
    assert worker.returncode != 0, out + err[-3000:]
    runs = runs_of(tmp_path)
    assert runs and {run.info.status for run in runs} == {"KILLED"}
