"""The model registry as users use it: load by stage or alias, move versions between them.

MLflow 3 deprecates stages in favour of aliases, but people load `models:/<name>/Production`;
we support both and keep MLflow's deprecation notices out of our users' output.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from covid_xray.config import HELD_STAGES, STAGES
from covid_xray.errors import UserError, first_line
from covid_xray.model.dicom_results import ModelIdentity
from covid_xray.model.pyfunc import DicomClassifier


def load(model_uri: str) -> DicomClassifier:
    """The covid-xray model behind `model_uri` (models:/name/Stage, models:/name@alias,
    models:/name/3, runs:/..., a local folder), with one clear line for every way it fails."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = mlflow.pyfunc.load_model(model_uri)
    except MlflowException as error:
        raise UserError(f"cannot load model {model_uri!r}: {first_line(error)}") from None
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


def load_resolved(model_uri: str) -> tuple[Any, DicomClassifier]:
    """(the registered version `model_uri` points at, or None outside the registry; that exact
    version's model, which knows its name, version and run). The alias or stage is resolved
    once and the version loaded by number: resolved twice, a move in between would have a run
    name a version that never answered."""
    version = resolve_version(model_uri)
    model = load(version_uri(version) if version else model_uri)
    if version:
        model.identity = ModelIdentity(version.name, str(version.version), version.run_id)
    return version, model


# What the registry answers for a name, version or alias it does not have. Anything else (a
# server that does not answer, a 500) is not "no such version" and is never read as one.
NOT_THERE = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")


def version_uri(version: Any) -> str:
    """`models:/<name>/<number>` of a registered version: that version, whatever moves."""
    return f"models:/{version.name}/{version.version}"


def model_name(model_uri: str) -> str:
    """The registered name in a `models:/` URI (by number, stage or alias); the URI itself
    otherwise."""
    return model_uri.removeprefix("models:/").split("@")[0].split("/")[0]


def resolve_version(model_uri: str):
    """The registered version a `models:/` URI points at (by number, stage or alias), or None
    for URIs outside the registry (runs:/, a folder, a bare logged model) and for a version
    it does not have. A registry that cannot answer is one line (UserError), not None: read
    as "unregistered", a model loaded by its alias named no version in its reports."""
    if not model_uri.startswith("models:/") or model_uri.startswith("models:/m-"):
        return None
    reference = model_uri.removeprefix("models:/")
    client = MlflowClient()
    try:
        if "@" in reference:
            return client.get_model_version_by_alias(*reference.split("@", 1))
        which = reference.partition("/")[2]
        name = model_name(model_uri)
        if which.isdigit():
            return client.get_model_version(name, which)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found = client.get_latest_versions(name, None if which == "latest" else [which])
        return max(found, key=lambda version: int(version.version)) if found else None
    except MlflowException as error:
        if error.error_code in NOT_THERE:
            return None
        raise UserError(f"the model registry cannot resolve {model_uri} now "
                        f"({first_line(error)})") from None


def run_id_of(model_uri: str) -> str | None:
    """The run that logged the model at a `runs:/<id>/...` or `models:/m-...` URI (None for
    anything else: a folder knows no run)."""
    if model_uri.startswith("runs:/"):
        return model_uri.removeprefix("runs:/").split("/", 1)[0] or None
    if model_uri.startswith("models:/m-"):
        try:
            return mlflow.get_logged_model(model_uri.removeprefix("models:/")).source_run_id
        except MlflowException:
            return None
    return None


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


def check_move(stage: str, alias: str) -> None:
    """Refuse a request that names no valid move, before any work is done."""
    if stage not in STAGES:
        raise UserError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
    if stage == "None" and not alias:
        raise UserError("nothing to do: give a stage (Staging, Production) and/or an alias")


def promote(name: str, version: str, *, stage: str = "None", alias: str = "") -> Promotion:
    """Move `version` to `stage` (archiving the previous holders) and/or give it `alias`.
    Whether it should move is serving/promotion.py's question; this only moves it."""
    check_move(stage, alias)
    client = MlflowClient()
    candidate = get_version(client, name, version)
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


def get_version(client: MlflowClient, name: str, version: str):
    try:
        return client.get_model_version(name, str(version))
    except MlflowException:
        raise UserError(f"registered model {name!r} has no version {version}") from None


def holders(client: MlflowClient, name: str, stage: str, alias: str) -> list:
    """The versions that hold `stage` (unless None or Archived) or `alias` now."""
    found = []
    if stage in HELD_STAGES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found += client.get_latest_versions(name, [stage])
    if alias:
        with contextlib.suppress(MlflowException):  # nobody holds the alias yet
            found.append(client.get_model_version_by_alias(name, alias))
    return found
