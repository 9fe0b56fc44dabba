"""Hyperparameter search: an Optuna study whose trials are ordinary training runs.

One worker invocation = one parent MLflow run; each trial = one nested run that takes train's
first steps (`run.prepare`, `run.fit_in_run`): validation only, no test split and no model, so
trials are chosen on val alone; `register_best` retrains the best configuration in full. The
study lives in an Optuna RDB storage (sqlite by default, PostgreSQL to share it), so workers on
several machines can join one study by name. A worker that dies mid-trial stops sending
heartbeats; the next worker to start a trial marks that trial FAIL and its MLflow runs KILLED,
so nothing is left RUNNING.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import secrets
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlflow
import optuna
import sqlalchemy
import yaml
from mlflow.tracking import MlflowClient

from covid_xray import lifecycle
from covid_xray.config import DEFAULT_SPACE, TrainConfig, TuneConfig
from covid_xray.credentials import hide_password
from covid_xray.errors import RunStopped, UserError, first_line
from covid_xray.files import sqlite_turn
from covid_xray.tracking import mlflow_run
from covid_xray.training.run import (
    effective_config,
    fit_in_run,
    prepare,
    prepare_data,
    register,
    train_in_run,
)

TRAIN_FIELDS = {field.name for field in dataclasses.fields(TrainConfig)}
# Set by `-P workers=N` (training/tune_workers.py) for its workers: nest each worker's run
# under the command's.
PARENT_RUN_VARIABLE = "COVID_XRAY_PARENT_RUN_ID"


def optuna_direction(metric: str) -> str:
    """Optuna's direction for a validation metric: losses go down, the rest up."""
    return "minimize" if metric.endswith("loss") else "maximize"


class TrialPruned(optuna.TrialPruned, RunStopped):
    """Optuna's pruning signal that also ends the trial's MLflow run as KILLED, not FAILED."""


class StudyFull(Exception):
    """The study has all the trials `n_trials` allows: this worker starts no more."""


# The trials n_trials counts: all but the failed (a failed one is replaced, not counted).
COUNTED = (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING,
           optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


class CappedStorage(optuna.storages.RDBStorage):
    """Optuna's RDB storage, creating a new trial only while the study has fewer than
    `limit` counted trials, every worker on every machine included. Counting and creating
    happen under one lock (a file lock for sqlite, an advisory lock for PostgreSQL), so three
    workers started together with n_trials=6 start exactly 6 trials between them: Optuna's
    MaxTrialsCallback counts only after a trial, so racing workers overshoot it."""

    def __init__(self, url: str, limit: int | None = None, **kwargs: Any):
        super().__init__(url, **kwargs)
        self.limit = limit

    # Optuna's study talks to its storage through a cache that calls this (private) method,
    # as RDBStorage.create_new_trial does: the one way a trial is made.
    def _create_new_trial(self, study_id: int,
                          template_trial: optuna.trial.FrozenTrial | None = None
                          ) -> optuna.trial.FrozenTrial:
        if self.limit is None or template_trial is not None:  # a queued retry: counted
            return super()._create_new_trial(study_id, template_trial)
        with self._one_at_a_time():
            started = len(self.get_all_trials(study_id, deepcopy=False, states=COUNTED))
            if started >= self.limit:
                raise StudyFull(f"the study has its {self.limit} trials")
            return super()._create_new_trial(study_id)

    @contextlib.contextmanager
    def _one_at_a_time(self) -> Iterator[None]:
        if self.engine.dialect.name != "postgresql":
            with sqlite_turn(self.url):  # sqlite: a file lock; other databases: none
                yield
            return
        with self.engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"),
                               {"key": TRIAL_LOCK_KEY})
            try:
                yield
            finally:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"),
                                   {"key": TRIAL_LOCK_KEY})
                connection.commit()


# PostgreSQL advisory lock id taken while a worker counts and creates a trial.
TRIAL_LOCK_KEY = 0x636F7669  # "covi"


def load_space(path: str) -> dict[str, dict[str, Any]]:
    """The search space from a YAML or JSON file (JSON is YAML), checked entry by entry."""
    try:
        space = yaml.safe_load(Path(path).read_text())
    except OSError as error:
        raise UserError(f"{path}: cannot read search space ({error.strerror})") from None
    except yaml.YAMLError as error:
        raise UserError(f"{path}: not valid YAML/JSON ({error})".replace("\n", " ")) from None
    check_space(space, path)
    return space


def check_space(space: object, source: str = "search space") -> None:
    """Refuse, in one line, any space a trial would fail on: unknown names, missing keys,
    empty or inverted ranges, log ranges through zero, choices a train option does not take."""
    if not isinstance(space, dict) or not space:
        raise UserError(f"{source}: must map train parameter names to distributions")
    fields = {field.name: field for field in dataclasses.fields(TrainConfig)}
    for name, spec in space.items():
        if name not in fields:
            raise UserError(f"{source}: unknown search-space parameter {name!r}; train "
                            f"parameters are {', '.join(sorted(fields))}")
        kind = spec.get("type") if isinstance(spec, dict) else None
        needed = {"float": {"low", "high"}, "int": {"low", "high"},
                  "categorical": {"choices"}}.get(kind)
        if needed is None or not needed <= set(spec):
            raise UserError(f"{source}: {name} needs type float/int (with low, high) or "
                            f"categorical (with choices), got {spec!r}")
        if kind == "categorical":
            _check_choices(name, spec["choices"], fields[name], source)
            continue
        low, high = spec["low"], spec["high"]
        numbers = (int,) if kind == "int" else (int, float)
        if not all(isinstance(v, numbers) and not isinstance(v, bool) for v in (low, high)):
            raise UserError(f"{source}: {name} low and high must be {kind}s, got {low!r}, "
                            f"{high!r}")
        if low > high:
            raise UserError(f"{source}: {name} has low {low} above high {high}")
        if spec.get("log") and low <= 0:
            raise UserError(f"{source}: {name} is searched on a log scale, so low must be "
                            f"above 0, got {low}")


def _check_choices(name: str, choices: object, field: dataclasses.Field, source: str) -> None:
    """Every choice must be a value the train option accepts, as train would parse it."""
    if not isinstance(choices, list) or not choices:
        raise UserError(f"{source}: {name} choices must be a non-empty list, got {choices!r}")
    allowed = field.metadata.get("choices")
    expected = {"int": int, "float": (int, float), "bool": bool, "str": str}[str(field.type)]
    for choice in choices:
        wrong_type = not isinstance(choice, expected) or (
            isinstance(choice, bool) and expected is not bool)
        if wrong_type or (allowed and choice not in allowed):
            what = f"one of {', '.join(allowed)}" if allowed else f"a {field.type}"
            raise UserError(f"{source}: {name} choice {choice!r} is not {what}")


def suggest(trial: optuna.Trial, space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    values = {}
    for name, spec in space.items():
        if spec["type"] == "categorical":
            values[name] = trial.suggest_categorical(name, spec["choices"])
        elif spec["type"] == "int":
            values[name] = trial.suggest_int(name, spec["low"], spec["high"],
                                             log=spec.get("log", False))
        else:
            values[name] = trial.suggest_float(name, spec["low"], spec["high"],
                                               log=spec.get("log", False))
    return values


def default_storage() -> str:
    """optuna.db beside the sqlite tracking store, else in the working folder."""
    tracking_uri = mlflow.get_tracking_uri()
    folder = Path(".")
    if tracking_uri.startswith("sqlite:///"):
        folder = Path(tracking_uri.removeprefix("sqlite:///")).parent
    return f"sqlite:///{(folder / 'optuna.db').resolve()}"


def parse_url(url: str) -> sqlalchemy.engine.URL:
    try:
        return sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError:
        raise UserError(f"storage {url.split('@')[-1]!r} is not a database URL (e.g. "
                        "sqlite:///optuna.db or postgresql://user@host/db)") from None


def storage_url(config: TuneConfig) -> str:
    """-P storage, else $OPTUNA_STORAGE, else the default sqlite file.

    A password inside -P storage is refused: `mlflow run` logs every -P value as a param.
    Credentials belong in PGPASSWORD / ~/.pgpass (libpq reads them) or in $OPTUNA_STORAGE.
    """
    if config.storage:
        if parse_url(config.storage).password is not None:
            # `mlflow run` has logged it as a param already: that run goes too.
            raise UserError("storage must not contain a password (mlflow run logs parameters); "
                            "pass the whole URL in the OPTUNA_STORAGE environment variable, or "
                            "put the password in PGPASSWORD or ~/.pgpass"
                            + mlflow_run.delete_started_run())
        return config.storage
    return os.environ.get("OPTUNA_STORAGE") or default_storage()


def open_study(config: TuneConfig, direction: str,
               attempts: int = 5) -> tuple[optuna.Study, int]:
    """Create the study, or join it; return it with this worker's sampler seed. Workers
    starting together on an empty database race to create Optuna's tables (PostgreSQL reports
    a unique violation, sqlite "table ... already exists"): the loser waits and tries again,
    finding the tables made. On sqlite a file lock beside the database also takes turns."""
    url = storage_url(config)
    for attempt in range(1, attempts + 1):
        try:
            with sqlite_turn(url):
                return _create_or_load_study(config, url, direction)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError,
                sqlalchemy.exc.OperationalError) as error:
            racing = not isinstance(error, sqlalchemy.exc.OperationalError) or (
                "already exists" in str(error) or "locked" in str(error))
            if racing and attempt < attempts:
                time.sleep(attempt)
                continue
            failure: Exception = error
        except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as error:
            failure = error
        reason = first_line(failure) or type(failure).__name__
        raise UserError(f"cannot open Optuna storage {hide_password(url)}: {reason}") from None


def _create_or_load_study(config: TuneConfig, url: str,
                          direction: str) -> tuple[optuna.Study, int]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry_once = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)

        def on_lost_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            _end_orphaned_runs(study, trial)
            retry_once(study, trial)  # queue its configuration again, once

        storage = CappedStorage(
            url, limit=config.n_trials,
            engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite")
            else {"pool_pre_ping": True},
            heartbeat_interval=config.heartbeat,
            grace_period=3 * config.heartbeat,
            heartbeat_stale_trial_callback=on_lost_trial,
        )
    existing = {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(storage)}
    seed = sampler_seed(config, existing.get(config.study_name, 0))
    # constant_liar: a trial running on another worker counts as a bad result meanwhile, so
    # workers sharing the study do not all sample next to the same promising point.
    study = optuna.create_study(
        study_name=config.study_name, storage=storage, direction=direction,
        load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=seed, constant_liar=True),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1),
    )
    return study, seed


def sampler_seed(config: TuneConfig, trials_so_far: int) -> int:
    """The TPE seed for this worker. TPE's first trials are random draws from this seed, so
    workers sharing a seed (the old default, for workers started together) run the same
    configurations. Default: a fresh seed per worker, logged so a run can be traced. An
    explicit seed, offset by the trials already in the study, repeats a single-worker study."""
    if config.sampler_seed < 0:
        return secrets.randbelow(2**31)
    return config.sampler_seed + trials_so_far


def run_study(config: TuneConfig, fixed: dict[str, Any]) -> optuna.Study:
    """Run `config.n_trials` trials of `fixed` + searched train parameters; log and return."""
    space = load_space(config.space) if config.space else dict(DEFAULT_SPACE)
    unknown = set(fixed) - TRAIN_FIELDS
    if unknown:
        raise UserError(f"unknown train parameter(s): {', '.join(sorted(unknown))}")
    if fixed.get("nproc", 1) != 1:
        raise UserError("tune trains each trial in one process: leave nproc at 1, and run "
                        "trials side by side with workers=N (one per GPU)")
    space = {name: spec for name, spec in space.items() if name not in fixed}
    base = dataclasses.replace(TrainConfig(), **fixed)
    # We print one line per trial, failures included (Optuna's own carry a traceback).
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    mlflow_run.check_tracking_server()  # before open_study: a failed start creates no files
    study, seed = open_study(config, optuna_direction(config.metric))
    print(f"study {config.study_name}: this worker's sampler seed is {seed}")
    # Data problems are the user's to fix once, not a failure per trial; this also fills the
    # cache, so trials only read it (unless img_size or apply_voi_lut are searched).
    prepare_data(effective_config(base))

    with mlflow_run.tracked_run(base.experiment_name, run_name=f"study-{config.study_name}",
                                parent_run_id=os.environ.get(PARENT_RUN_VARIABLE)) as parent:
        mlflow_run.log_params({f"tune/{key}": value for key, value in
                               dataclasses.asdict(config).items() if key != "storage"}
                              | {"tune/storage": hide_password(storage_url(config)),
                                 "tune/sampler_seed_used": seed,
                                 "tune/space": yaml.safe_dump(space, sort_keys=True)}
                              | {f"fixed/{key}": value for key, value in fixed.items()})
        objective = training_objective(config, base, space, parent.info.run_id)
        tally = run_trials(study, objective, config)
        log_study(study, config)
        tally.check()
        if config.register_best:
            retrain_best(study, base, config.metric)
    return study


def training_objective(config: TuneConfig, base: TrainConfig, space: dict[str, dict[str, Any]],
                       parent_run_id: str) -> Callable[[optuna.Trial], float]:
    """A trial: `base` with the searched values, trained in a run nested under the worker's,
    reporting `config.metric` each epoch to the pruner; returns its best epoch's value."""

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("mlflow_parent_run_id", parent_run_id)
        trial_config = dataclasses.replace(base, **suggest(trial, space),
                                           registered_model_name="")
        # The whole configuration, so register_best retrains exactly this one, even when
        # the best trial ran on another worker with other fixed options.
        trial.set_user_attr("train_config", dataclasses.asdict(trial_config))

        def report(row: dict[str, float]) -> None:
            trial.report(row[config.metric], int(row["epoch"]))
            if trial.should_prune():
                mlflow.set_tag("trial_state", "PRUNED")
                raise TrialPruned(f"pruned at epoch {int(row['epoch'])}")

        retry_of = _retried_trial_number(trial)  # a lost worker's trial, run again
        prepared = prepare(trial_config, progress=False)
        with mlflow_run.tracked_run(base.experiment_name, run_name=f"trial-{trial.number}",
                                    nested=True,
                                    system_metrics=trial_config.system_metrics) as run:
            # Recorded first, so a worker that dies mid-trial has its run closed.
            trial.set_user_attr("mlflow_run_id", run.info.run_id)
            # Validation only: a trial is chosen on val, so it never sees the test split,
            # and logs no model (register_best, or train with its params, makes the model).
            result = fit_in_run(
                prepared, progress=False, on_epoch=report,
                tags={"optuna_study": config.study_name, "optuna_trial": str(trial.number)}
                | ({"optuna_retry_of": str(retry_of)} if retry_of is not None else {}))
        value = result.history[result.best_epoch - 1][config.metric]
        if math.isnan(value):  # Optuna fails the trial: say so in its run too
            MlflowClient().set_tag(run.info.run_id, "trial_state", "FAIL")
            raise UserError(f"trial {trial.number}: {config.metric} is NaN (a validation "
                            "split without both classes?); use more studies")
        MlflowClient().set_tag(run.info.run_id, "trial_state", "COMPLETE")
        print(f"trial {trial.number}: {config.metric} {value:.4f} with "
              f"{ {k: trial.params[k] for k in sorted(trial.params)} }")
        return value

    return objective


@dataclasses.dataclass
class Tally:
    """What one worker did: the trials it started and the failures among them."""

    started: list[int] = dataclasses.field(default_factory=list)
    failures: list[str] = dataclasses.field(default_factory=list)

    def check(self) -> None:
        """A worker whose every trial failed did not succeed (a timeout does not hide it)."""
        if self.failures and len(self.failures) == len(self.started):
            raise UserError(f"all {len(self.failures)} trials of this worker failed; first: "
                            f"{self.failures[0]}")


def run_trials(study: optuna.Study, objective: Callable[[optuna.Trial], float],
               config: TuneConfig) -> Tally:
    """Run `objective` as this worker's trials of `study`: until the study has its n_trials
    (study-wide: CappedStorage refuses the next one), this worker has started n_trials itself
    (a failed trial is not counted, so trials that always fail cannot loop forever), or the
    timeout. A trial that raises is that trial's failure; a stop signal (KeyboardInterrupt)
    stops the worker."""
    tally = Tally()

    def recorded(trial: optuna.Trial) -> float:
        tally.started.append(trial.number)
        try:
            return objective(trial)
        except UserError as error:
            tally.failures.append(str(error))
            print(f"trial {trial.number} failed: {error}")
            raise
        except optuna.TrialPruned:
            raise  # a pruned trial is no failure
        except Exception as error:  # CUDA out of memory, say: this trial, not the study
            tally.failures.append(f"trial {trial.number}: {type(error).__name__}: {error}")
            print(f"trial {trial.number} failed: {type(error).__name__}: {error}")
            raise

    deadline = time.monotonic() + config.timeout if config.timeout else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        while len(tally.started) < config.n_trials:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            try:
                study.optimize(recorded, n_trials=config.n_trials - len(tally.started),
                               timeout=left, catch=(Exception,))
                break
            except StudyFull:
                # Full, counting trials other workers are running: a worker killed mid-trial
                # leaves one RUNNING until its heartbeat goes stale. Wait for them: a lost one
                # is failed and queued again, and this worker runs it.
                if not wait_for_running_trials(study, config.heartbeat, deadline):
                    print(f"study {config.study_name} has its {config.n_trials} trials; this "
                          f"worker ran {len(tally.started)} of them")
                    break
    return tally


def wait_for_running_trials(study: optuna.Study, heartbeat: float,
                            deadline: float | None) -> bool:
    """While trials of other workers are RUNNING, wait, failing those whose worker stopped
    beating (Optuna's grace period: 3 heartbeats; the stale-trial callback ends their runs
    KILLED and queues their configuration once more). True as soon as a queued trial waits
    to be run; False when nothing runs any more (or past `deadline`)."""
    running, waiting = (optuna.trial.TrialState.RUNNING,), (optuna.trial.TrialState.WAITING,)
    while study.get_trials(deepcopy=False, states=running):
        optuna.storages.fail_stale_trials(study)
        if study.get_trials(deepcopy=False, states=waiting):
            return True
        if deadline is not None and time.monotonic() > deadline:
            return False
        time.sleep(min(5.0, heartbeat))
    return bool(study.get_trials(deepcopy=False, states=waiting))


def log_study(study: optuna.Study, config: TuneConfig) -> None:
    """Best params and value, trial counts and Optuna's plots on the parent run."""
    states = [trial.state.name for trial in study.trials]
    mlflow.log_metrics({f"trials_{state.lower()}": states.count(state)
                        for state in ("COMPLETE", "PRUNED", "FAIL")})
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not completed:
        print("no trial completed; nothing to report")
        return
    mlflow.log_metric(f"best_{config.metric}", study.best_value)
    mlflow_run.log_params({f"best/{key}": value for key, value in study.best_params.items()}
                          | {"best/trial": study.best_trial.number})
    print(f"best trial {study.best_trial.number}: {config.metric} {study.best_value:.4f} "
          f"with {study.best_params}")
    plots = optuna.visualization.matplotlib
    for name, plot in (("optimization_history", plots.plot_optimization_history),
                       ("param_importances", plots.plot_param_importances),
                       ("parallel_coordinate", plots.plot_parallel_coordinate)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = plot(study)
        except (ValueError, RuntimeError, ZeroDivisionError) as error:
            print(f"skipped the {name} plot: {error}")  # e.g. importances need 2+ trials
            continue
        figure = axes.flat[0].figure if hasattr(axes, "flat") else axes.figure
        figure.set_size_inches(9, 5)
        figure.tight_layout()  # Optuna's layout cuts long parameter names off
        mlflow_run.log_figure(figure, f"optuna_{name}")


def retrain_best(study: optuna.Study, base: TrainConfig, metric: str) -> None:
    """Retrain the best trial's exact configuration and seed, register it, and check that it
    reproduced the trial's validation metric (it does on CPU: runs are deterministic)."""
    if not any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials):
        raise UserError("register_best: no completed trial to retrain")
    trial = study.best_trial
    recorded = trial.user_attrs.get("train_config")
    best = (TrainConfig(**recorded) if recorded else
            dataclasses.replace(base, **trial.params))  # a study made before configs were kept
    best = dataclasses.replace(best, registered_model_name=base.registered_model_name,
                               stage=base.stage, alias=base.alias)
    prepared = prepare(best, progress=False)
    with mlflow_run.tracked_run(best.experiment_name, run_name="best-retrain", nested=True,
                                system_metrics=best.system_metrics):
        outcome = train_in_run(prepared, progress=False,
                               tags={"optuna_study": study.study_name,
                                     "optuna_trial": str(trial.number)})
        register(outcome, prepared.config)
    value = outcome.history[outcome.best_epoch - 1][metric]
    mlflow.log_metric(f"best_retrain_{metric}", value)
    verdict = ("reproduced" if math.isclose(value, trial.value, rel_tol=1e-6, abs_tol=1e-9)
               else f"differs from the trial's {trial.value:.6f} (GPU kernels are not "
                    "bitwise deterministic)")
    print(f"retrained trial {trial.number}'s configuration: run {outcome.run_id}, {metric} "
          f"{value:.6f} {verdict}; registered version {outcome.registered_version}")


def _retried_trial_number(trial: optuna.Trial) -> int | None:
    """The trial this one retries (Optuna records it on the frozen trial only)."""
    running = trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    frozen = next((t for t in running if t.number == trial.number), None)
    if frozen is None:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)


def _end_orphaned_runs(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """A worker died mid-trial: end its runs as KILLED so none stays RUNNING forever.

    Runs on whichever worker notices, inside Optuna's bookkeeping: anything the tracking side
    throws (a run this worker's store does not know, a server briefly down) is one line, and
    the study carries on."""
    run_ids = [trial.user_attrs.get(key) for key in ("mlflow_run_id", "mlflow_parent_run_id")]
    for problem in lifecycle.end_if_running([run_id for run_id in run_ids if run_id], "KILLED",
                                            {"trial_state": "FAIL (worker lost)"}):
        print(f"trial {trial.number}: {problem}; carrying on")
    print(f"trial {trial.number} lost its worker: marked FAIL, its MLflow runs KILLED, "
          "its configuration queued once more")
