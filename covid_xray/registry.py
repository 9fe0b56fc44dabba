"""The model registry as users use it: load by stage or alias, promote (optionally if better).

MLflow 3 deprecates stages in favour of aliases, but people load `models:/<name>/Production`;
we support both and keep MLflow's deprecation notices out of our users' output.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from covid_xray.errors import UserError
from covid_xray.pyfunc import DicomClassifier

STAGES = ("None", "Staging", "Production", "Archived")


def load(model_uri: str) -> DicomClassifier:
    """The covid-xray model behind `model_uri` (models:/name/Stage, models:/name@alias,
    models:/name/3, runs:/..., a local folder), with one clear line for every way it fails."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = mlflow.pyfunc.load_model(model_uri)
    except MlflowException as error:
        first_line = str(error.message).strip().splitlines()[0]
        raise UserError(f"cannot load model {model_uri!r}: {first_line}") from None
    except OSError as error:
        raise UserError(f"cannot load model {model_uri!r}: {error}") from None
    try:
        model = loaded.unwrap_python_model()
    except MlflowException:
        model = None
    if not isinstance(model, DicomClassifier):
        raise UserError(f"{model_uri} is not a covid-xray model (it was logged by something "
                        "else); train one with `mlflow run . -e train`")
    return model


def logged_model_id(version) -> str | None:
    """The MLflow 3 logged model behind a registered version (`m-...`), so evaluations can be
    linked to it. The registry does not always fill `model_id`; its `source` names it."""
    if getattr(version, "model_id", None):
        return version.model_id
    source = version.source or ""
    return source.removeprefix("models:/") if source.startswith("models:/m-") else None


@dataclass
class Promotion:
    promoted: bool
    message: str


def promote(name: str, version: str, *, stage: str = "None", alias: str = "",
            if_better: str = "") -> Promotion:
    """Move `version` to `stage` (archiving the previous holders) and/or give it `alias`.

    With `if_better`, a test metric name such as `roc_auc`, only when the candidate's run beat
    every current holder of that stage / alias on it (higher is better); otherwise nothing
    moves and the message says why.
    """
    if stage not in STAGES:
        raise UserError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
    if stage == "None" and not alias:
        raise UserError("nothing to do: give a stage (Staging, Production) and/or an alias")
    client = MlflowClient()
    candidate = _version(client, name, version)

    if if_better:
        mine = _metric(client, candidate, if_better)
        for holder in _holders(client, name, stage, alias):
            if holder.version == candidate.version:
                continue
            theirs = _metric(client, holder, if_better)
            if not mine > theirs:
                return Promotion(False, f"not promoted: version {version} has {if_better} "
                                        f"{mine:.4f}, current version {holder.version} has "
                                        f"{theirs:.4f}")

    moved = []
    if stage != "None":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            client.transition_model_version_stage(name, candidate.version, stage,
                                                  archive_existing_versions=True)
        moved.append(f"stage {stage}")
    if alias:
        client.set_registered_model_alias(name, alias, candidate.version)
        moved.append(f"alias @{alias}")
    return Promotion(True, f"{name} version {version} -> {' and '.join(moved)}")


def _version(client: MlflowClient, name: str, version: str):
    try:
        return client.get_model_version(name, str(version))
    except MlflowException:
        raise UserError(f"registered model {name!r} has no version {version}") from None


def _holders(client: MlflowClient, name: str, stage: str, alias: str) -> list:
    holders = []
    if stage not in ("None", "Archived"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            holders += client.get_latest_versions(name, [stage])
    if alias:
        with contextlib.suppress(MlflowException):  # nobody holds the alias yet
            holders.append(client.get_model_version_by_alias(name, alias))
    return holders


def _metric(client: MlflowClient, version, metric: str) -> float:
    """The version's `test_<metric>` (or `<metric>`) from the run that trained it."""
    run_id = version.run_id or version.tags.get("run_id")
    metrics = client.get_run(run_id).data.metrics if run_id else {}
    for key in (f"test_{metric}", metric):
        if key in metrics:
            return float(metrics[key])
    raise UserError(f"version {version.version} of {version.name}: its run has no metric "
                    f"test_{metric} (known: {', '.join(sorted(metrics)) or 'none'})")
