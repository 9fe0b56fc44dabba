"""One MLflow run: check the tracking server first, start the run and always end it with a
status, log into it (params, metrics, figures, the splits as dataset inputs, the model) and
register its model. Train's runs, tune's and evaluate's are all made here.

Other modules use MLflow for their own job (registry.py beside it and serving/promotion.py the
registry, model/pyfunc.py the model format, training/tune.py the study's bookkeeping); the
imaging, data and evaluation layers and training/loop.py never import it.

The tracking URI is MLflow's own choice: `MLFLOW_TRACKING_URI` when set, else the sqlite store
`mlflow.db` in the working directory (MLflow 3's default), which `mlflow ui` there reads and
whose registry works. Under `mlflow run` the run already exists (MLFLOW_RUN_ID) and we log
into it rather than starting a second one.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import logging
import os
import sqlite3
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path, PurePath
from typing import Any

import click
import matplotlib.pyplot as plt
import mlflow
import numpy as np
import pandas as pd
import requests
from matplotlib.figure import Figure
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.rest_utils import http_request

from covid_xray import lifecycle
from covid_xray.errors import RunStopped, UserError
from covid_xray.evaluation.report import Evaluation
from covid_xray.files import sqlite_turn
from covid_xray.model import artifacts, pyfunc
from covid_xray.model.pyfunc import DicomClassifier
from covid_xray.model.requests import example_input
from covid_xray.tracking import registry
from covid_xray.tracking.manifests import MANIFEST_ARTIFACT, THUMBNAILS_ARTIFACT

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # covid_xray/: logged whole with each model
# What a logged model imports to load and predict (pinned to what trained it; MLflow adds
# itself). tests/test_serve.py serves a model from a virtualenv holding only these.
MODEL_REQUIREMENTS = ("torch", "torchvision", "torchxrayvision", "numpy", "pandas", "pydicom",
                      "python-gdcm", "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg",
                      "pylibjpeg-rle", "opencv-python-headless", "imagecodecs", "highdicom")


def check_tracking_server() -> str:
    """Fail fast, before any data or file work, when the tracking store cannot take our
    runs: a remote server that does not answer or refuses our login (MLflow's own client
    retries for about four minutes and then may blame something else), or a local store we
    cannot write. Every entry point that talks to MLflow calls this first."""
    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///"):
        _check_writable(Path(uri.removeprefix("sqlite:///")))
    if not uri.startswith(("http://", "https://")):
        return uri
    # MLflow's own HTTP client, so the probe trusts what its runs will trust: a private CA
    # (MLFLOW_TRACKING_SERVER_CERT_PATH), MLFLOW_TRACKING_INSECURE_TLS, client certificates,
    # tokens. No retries: an answer, or one line now.
    try:
        status = http_request(get_default_host_creds(uri), "/health", "GET", max_retries=0,
                              backoff_factor=0, timeout=10, raise_on_status=True).status_code
        why = f"HTTP {status}" if status != 200 else ""
    except (MlflowException, requests.RequestException) as error:
        # MLflow wraps the requests error it gave up on: name that one.
        cause = error.__context__ if isinstance(error.__context__,
                                                requests.RequestException) else error
        why = type(cause).__name__
        if isinstance(cause, requests.exceptions.SSLError):
            why = ("TLS certificate not trusted; set MLFLOW_TRACKING_SERVER_CERT_PATH to its "
                   "CA bundle")
    if why:
        raise UserError(f"MLflow tracking server {uri} is unreachable ({why}); start it (e.g. "
                        "`mlflow server --host 127.0.0.1`) or unset MLFLOW_TRACKING_URI to use "
                        "the local mlflow.db")
    try:  # /health needs no login: one small authenticated call tells a bad password now
        MlflowClient().search_experiments(max_results=1)
    except MlflowException as error:
        status = error.get_http_status_code()
        if status not in (401, 403):
            raise
        user = os.environ.get("MLFLOW_TRACKING_USERNAME", "")
        who = f"user {user!r}" if user else "an anonymous user (no MLFLOW_TRACKING_USERNAME)"
        raise UserError(f"MLflow tracking server {uri} refused {who} (HTTP {status}); check "
                        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD") from None
    return uri


def _check_writable(database: Path) -> None:
    """A sqlite store must take a write lock, and its folder new files (the journal, the
    store's lock, `mlruns/`): else the first write of a run fails, after the data work, in
    a chain of tracebacks."""
    folder = database.parent if str(database.parent) else Path(".")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
        if database.exists():
            connection = sqlite3.connect(database, timeout=30)
            try:
                # A write, rolled back: sqlite opens a file it may not write read-only, and
                # only a write says so. (Setting user_version to itself changes nothing.)
                connection.execute("BEGIN IMMEDIATE")
                version = connection.execute("PRAGMA user_version").fetchone()[0]
                connection.execute(f"PRAGMA user_version = {int(version)}")
                connection.rollback()
            finally:
                connection.close()
    except (OSError, sqlite3.Error) as error:
        what = getattr(error, "strerror", None) or str(error)
        raise UserError(f"the MLflow tracking store {database} cannot be written ({what}); "
                        "make it and its folder writable, or point MLFLOW_TRACKING_URI at a "
                        "store you can write") from None


def delete_started_run() -> str:
    """Delete the run `mlflow run` created for this command, which logged a secret among its
    params (MLflow cannot delete one param). Ended first, so `mlflow run` finds it ended.
    Returns what was done and what is left to do, for the error line."""
    run_id = lifecycle.started_run_id()
    if not run_id:
        return ""
    try:
        client = MlflowClient()
        client.set_terminated(run_id, "FAILED")
        client.delete_run(run_id)
    except Exception as error:  # the server may be what failed: say what to do by hand
        return (f"; could not delete run {run_id} that `mlflow run` logged it in "
                f"({type(error).__name__}): delete it and run `mlflow gc`")
    return (f"; run {run_id}, which `mlflow run` logged it in, is deleted: `mlflow gc "
            f"--run-ids {run_id}` on the tracking store removes it for good")


@contextlib.contextmanager
def tracked_run(experiment_name: str, run_name: str | None = None, nested: bool = False,
                system_metrics: bool = False,
                parent_run_id: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run that always ends with a status: FINISHED, FAILED, or KILLED on Ctrl-C,
    SIGTERM (what `mlflow run` and job schedulers send) or a deliberate `RunStopped`. Never
    left RUNNING. `system_metrics` samples CPU, memory and GPU use into the run (psutil,
    nvidia-ml-py): the way to see DICOM decoding starve a GPU."""
    create_store_once()
    if parent_run_id:
        # A run nests under its parent in the parent's experiment, which may be another than
        # `experiment_name` (`mlflow run --experiment-name team -P workers=N`).
        mlflow.set_experiment(
            experiment_id=MlflowClient().get_run(parent_run_id).info.experiment_id)
    elif "MLFLOW_RUN_ID" not in os.environ and not nested:
        mlflow.set_experiment(experiment_name)
    resumed = "MLFLOW_RUN_ID" in os.environ and not nested and not parent_run_id
    run = mlflow.start_run(run_name=run_name, nested=nested, parent_run_id=parent_run_id,
                           log_system_metrics=system_metrics)
    if resumed and run_name:  # `mlflow run` named it at random: say what ran
        mlflow.set_tag("mlflow.runName", run_name)
    mark_experiment_kind(run.info.experiment_id)
    with lifecycle.stops_raise() if not nested else contextlib.nullcontext():
        try:
            yield run
        except KeyboardInterrupt:
            with lifecycle.stops_quieted():
                end_run(run.info.run_id, "KILLED")
            raise
        except RunStopped:
            end_run(run.info.run_id, "KILLED")
            raise
        except BaseException:
            end_run(run.info.run_id, "KILLED" if lifecycle.stopping() else "FAILED")
            raise
        else:
            end_run(run.info.run_id, "FINISHED")


# Tags that tie an evaluation run to the registered version it scored (serving/evaluate.py
# writes them; model cards and promotion find evaluations by them).
EVALUATED_NAME_TAG, EVALUATED_VERSION_TAG = "eval_model_name", "eval_model_version"
# MLflow 3's UI opens an experiment on its GenAI overview (traces, token usage) unless the
# experiment says it holds model training: ours open on the runs.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def ui_link(run: mlflow.ActiveRun) -> str:
    """Where the run's page is in the MLflow UI, in its model-training view (MLflow 3.17's UI
    starts in its GenAI view, whatever the experiment's kind, until a user switches)."""
    uri = mlflow.get_tracking_uri()
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else \
        "http://127.0.0.1:5000 (after `mlflow ui`)"
    page = (f"/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
            "?workflowType=machine_learning")
    if " " in base:
        address, note = base.split(" ", 1)
        return f"{address}{page} {note}"
    return base + page


def mark_experiment_kind(experiment_id: str) -> None:
    """Tag the experiment as model development, once (a kind someone set is left alone)."""
    client = MlflowClient()
    (key, value), = EXPERIMENT_KIND.items()
    if key not in client.get_experiment(experiment_id).tags:
        client.set_experiment_tag(experiment_id, key, value)


def end_run(run_id: str, status: str) -> None:
    """End the active run with `status`, even when `mlflow.end_run` is cut short (a dying
    DataLoader worker makes torch raise from its SIGCHLD handler in whatever code runs next):
    then the status is set directly and MLflow's active-run stack is popped."""
    try:
        mlflow.end_run(status)
    except BaseException:
        for problem in lifecycle.end_if_running([run_id], status):
            print(problem, file=sys.stderr)
        active = mlflow.active_run()
        if active is not None and active.info.run_id == run_id:
            with contextlib.suppress(BaseException):
                mlflow.end_run(status)


def create_store_once() -> None:
    """MLflow creates and migrates a new sqlite store on first use; two workers doing that at
    once collide ("duplicate column name"). Let one at a time do it, under a file lock."""
    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///"):
        with sqlite_turn(uri):
            MlflowClient().search_experiments(max_results=1)


# Options that name files or folders: logged without this machine's absolute paths.
PATH_OPTIONS = ("input", "output", "csv", "heatmaps", "dicom_out", "evaluate_on")


def log_params(params: dict[str, Any]) -> None:
    """Log params, living with what `mlflow run` already logged for the same run.

    MLflow forbids changing a param, and `mlflow run` logs its -P values first, as typed
    (`true`, `1e-3`, an empty string as "''"). Values equal to ours are skipped; a value we
    changed (img_size for xrv weights) is logged again as `<name>_effective`. A file or folder
    (`PATH_OPTIONS`, `*_dir`) is logged as given when relative and by its last part when
    absolute: the record is read on other machines, where this one's paths are nobody's
    business (and may name people). What `mlflow run` logged as the user typed it stays.
    """
    logged = mlflow.get_run(mlflow.active_run().info.run_id).data.params
    fresh = {}
    for key, value in params.items():
        is_path = key in PATH_OPTIONS or key.endswith("_dir")
        if is_path:
            value = shareable_path(str(value))
        if key not in logged:
            fresh[key] = str(value)
        elif not is_path and not _same_value(logged[key], value):
            fresh[f"{key}_effective"] = str(value)
    mlflow.log_params(fresh)


def shareable_path(path: str) -> str:
    """A path as the record may hold it: as given when relative, its last part when absolute
    (`/srv/hospital/siim` -> `siim`)."""
    if not os.path.isabs(path):
        return path
    return PurePath(path.rstrip("/\\")).name or path


def _same_value(logged: str, value: Any) -> bool:
    """Whether a param `mlflow run` logged as typed means `value`: `-P hflip=true` is True,
    `-P lr=1e-3` is 0.001."""
    text = logged.strip("'\"")
    try:
        if isinstance(value, bool):  # parsed as the option was: every spelling Click takes
            return click.BOOL.convert(text, None, None) == value
        if isinstance(value, int | float):
            return float(text) == float(value)
    except (click.BadParameter, ValueError):
        return False
    return text == str(value)


def log_epoch(row: dict[str, float]) -> None:
    mlflow.log_metrics({key: value for key, value in row.items() if key != "epoch"},
                       step=int(row["epoch"]))


def log_figure(figure: Figure, name: str) -> None:
    mlflow.log_figure(figure, f"figures/{name}.png")
    plt.close(figure)


def log_evaluation(evaluation: Evaluation, prefix: str, *, model_id: str | None = None,
                   dataset: mlflow.data.dataset.Dataset | None = None) -> None:
    """An evaluation's numbers as `<prefix>_<metric>` (CIs as `_ci_low` / `_ci_high`), linked
    to a logged model and dataset when given, its figures under figures/ and its tables
    (subgroups) as CSVs."""
    mlflow.log_metrics({f"{prefix}_{key}": value for key, value in evaluation.metrics.items()},
                       model_id=model_id, dataset=dataset)
    for name, figure in evaluation.figures.items():
        log_figure(figure, name)
    for name, table in evaluation.tables.items():
        mlflow.log_text(table.to_csv(index=False), f"{name}.csv")


def log_manifest(table: pd.DataFrame, data_dir: Path, fingerprint: str,
                 thumbnails: np.ndarray | None = None
                 ) -> dict[str, mlflow.data.dataset.Dataset]:
    """Each split of the manifest as a dataset input of the run, context train / val / test
    (the whole manifest also as a CSV artifact, and each film's thumbnail, for finding its
    near-duplicates later, as plain arrays); returns them by split, so metrics can link to
    the data they were measured on."""
    datasets = {}
    for split in ("train", "val", "test"):
        digest = hashlib.blake2b(f"{fingerprint}:{split}".encode(), digest_size=8).hexdigest()
        datasets[split] = log_dataset(table[table.split == split].reset_index(drop=True),
                                      data_dir, digest, name=f"siim-{split}", context=split,
                                      targets="label")
    mlflow.log_text(table.to_csv(index=False), MANIFEST_ARTIFACT)
    if thumbnails is not None:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / Path(THUMBNAILS_ARTIFACT).name
            np.savez_compressed(path, study_id=table.study_id.to_numpy(dtype=str),
                                thumbnails=thumbnails.astype(np.float16))
            mlflow.log_artifact(str(path), str(Path(THUMBNAILS_ARTIFACT).parent))
    return datasets


def log_dataset(table: pd.DataFrame, data_dir: Path, fingerprint: str, *, name: str,
                context: str, targets: str | None = None) -> mlflow.data.dataset.Dataset:
    """`table` as a dataset input of the run, its digest taken from our data fingerprint."""
    with warnings.catch_warnings():
        # MLflow muses about how to read a folder source and about integer columns in the
        # schema; neither matters here, and users should not see either.
        warnings.simplefilter("ignore", UserWarning)
        # The folder by its name: the record holds no absolute path of this machine.
        dataset = mlflow.data.from_pandas(table, source=data_dir.resolve().name,
                                          targets=targets, name=name, digest=fingerprint[:16])
        try:
            mlflow.log_input(dataset, context=context)
        except MlflowException as error:
            # Workers starting together log the same dataset at once, and MLflow's store
            # inserts it twice (UNIQUE constraint): by now it exists, so link it again.
            if "UNIQUE constraint" not in str(error) and "duplicate key" not in str(error):
                raise
            mlflow.log_input(dataset, context=context)
    return dataset


def log_model(python_model: DicomClassifier) -> mlflow.models.model.ModelInfo:
    """Log the DICOM-speaking model as code (`served_model.py` plus this package) with its
    state as artifacts, its signature, an example request and its preprocessing (also in the
    MLmodel metadata, for people reading the registry). bench/load_model.py times loading."""
    metadata = python_model.preprocessing.as_dict() | {
        "class_names": list(python_model.class_names),
        "architecture": python_model.architecture} | python_model.operating.as_dict()
    with tempfile.TemporaryDirectory() as folder, _quiet_logger("mlflow.pyfunc"):
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PACKAGE_DIR / "model" / "served_model.py"),
            artifacts=artifacts.save(python_model, Path(folder)),
            signature=pyfunc.signature(python_model.class_names),
            input_example=example_input(),
            code_paths=[str(PACKAGE_DIR)],
            pip_requirements=_pinned_requirements(),
            metadata=metadata,
        )


def register_model(model_uri: str, name: str, tags: dict[str, str], stage: str = "None",
                   alias: str = "") -> str:
    """Register `model_uri` as a new version of `name`, tag it, move it; return the version.

    All or nothing: stop signals are held meanwhile, and one that came removes the new
    version again before it is let through (a stopped run registers nothing)."""
    with lifecycle.stops_deferred():
        version = str(mlflow.register_model(model_uri, name, tags=tags).version)
        lifecycle.pause_point("register")
        if lifecycle.stop_pending():
            MlflowClient().delete_model_version(name, version)
            print(f"stopped while registering: version {version} of {name} removed")
        elif stage != "None" or alias:
            print(registry.promote(name, version, stage=stage, alias=alias).message)
    return version


def git_provenance() -> dict[str, str]:
    """The project's commit, and whether the checkout had uncommitted changes to tracked
    files (then the commit alone does not say what ran); 'unknown' outside a git checkout."""
    def git(*arguments: str) -> str:
        return subprocess.run(["git", *arguments], cwd=PACKAGE_DIR, check=True,
                              capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        return {"git_commit": git("rev-parse", "HEAD"),
                "git_dirty": str(bool(git("status", "--porcelain", "--untracked-files=no"))
                                 ).lower()}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": "unknown", "git_dirty": "unknown"}


def _pinned_requirements() -> list[str]:
    pins = []
    for name in MODEL_REQUIREMENTS:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            pins.append(f"{name}=={importlib.metadata.version(name)}")
    return pins


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    """Hide a logger's INFO and WARNING lines for the duration; errors still show."""
    logger = logging.getLogger(name)
    previous_level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(previous_level)
