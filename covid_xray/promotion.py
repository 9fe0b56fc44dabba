"""Promotion on comparable evidence: a candidate replaces the holders of a stage or alias only
when it beats each of them on an evaluation of the same files, for the same task.

Each version's own test split is different data (other studies, another seed, maybe another
task), so comparing those numbers compares luck. Here the evidence is `evaluate` runs (see
external.py) that share a data fingerprint; `evaluate_on` makes that evidence first, reusing
any evaluation of the same version on the same files. Without comparable evidence nothing
moves, and the one-line error says how to get it.
"""

from __future__ import annotations

import mlflow
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from covid_xray import mlflow_run, registry
from covid_xray.config import EvaluateConfig, PromoteConfig
from covid_xray.errors import UserError
from covid_xray.evaluation import overlap
from covid_xray.external import (
    FINGERPRINT_TAG,
    MODEL_NAME_TAG,
    MODEL_VERSION_TAG,
    evaluate_model,
    read_labelled_set,
)
from covid_xray.registry import Promotion

HIGHER_IS_BETTER = ("roc_auc", "accuracy", "balanced_accuracy", "map", "sensitivity",
                    "specificity")
LOWER_IS_BETTER = ("ece", "brier")


def direction(metric: str) -> int:
    """+1 when a higher value is better, -1 when lower is; unknown names are refused rather
    than guessed (a loss compared upwards promotes the worst model)."""
    if metric in HIGHER_IS_BETTER or metric.startswith("ap_"):
        return 1
    if metric in LOWER_IS_BETTER:
        return -1
    raise UserError(f"if_better: {metric!r} is not an evaluation metric; use one of "
                    f"{', '.join(HIGHER_IS_BETTER)} (higher wins) or "
                    f"{', '.join(LOWER_IS_BETTER)} (lower wins)")


def promote(config: PromoteConfig, progress: bool = True) -> Promotion:
    """Move `config.version` as asked; with `if_better`, only if it wins on the evidence."""
    registry.check_move(config.stage, config.alias)
    mlflow_run.check_tracking_server()
    if not config.if_better:
        if config.evaluate_on:
            raise UserError("evaluate_on goes with if_better (the metric to compare on)")
        return registry.promote(config.name, config.version, stage=config.stage,
                                alias=config.alias)
    sign = direction(config.if_better)
    client = MlflowClient()
    candidate = registry.get_version(client, config.name, config.version)
    holders = [holder for holder in registry.holders(client, config.name, config.stage,
                                                     config.alias)
               if holder.version != candidate.version]
    if not holders:  # nothing to beat
        return registry.promote(config.name, config.version, stage=config.stage,
                                alias=config.alias)
    versions = [str(candidate.version), *dict.fromkeys(str(holder.version) for holder in holders)]
    _check_same_task(config.name, versions)
    if config.evaluate_on:
        evidence = _evaluate_all(config, versions, progress)
    else:
        evidence = _existing_evidence(config.name, versions)

    metric = f"eval_{config.if_better}"
    scores = {version: _score(run, metric, version) for version, run in evidence.items()}
    fingerprint = next(iter(evidence.values())).data.tags[FINGERPRINT_TAG]
    mine = scores[versions[0]]
    comparisons = []
    for version in versions[1:]:
        theirs = scores[version]
        note = ("; the 95% intervals overlap, so the difference may be chance"
                if overlap(mine[1], theirs[1]) else "")
        comparison = (f"version {versions[0]} has {config.if_better} {_show(mine)}, "
                      f"version {version} has {_show(theirs)} on the same data "
                      f"({fingerprint[:12]}){note}")
        if not sign * (mine[0] - theirs[0]) > 0:
            return Promotion(False, f"not promoted: {comparison}")
        comparisons.append(comparison)
    moved = registry.promote(config.name, config.version, stage=config.stage,
                             alias=config.alias)
    return Promotion(True, f"{moved.message} ({'; '.join(comparisons)})")


def _check_same_task(name: str, versions: list[str]) -> None:
    """A 2-class and a 4-class model answer different questions: no number compares them."""
    tasks = {}
    for version in versions:
        try:
            metadata = mlflow.models.get_model_info(f"models:/{name}/{version}").metadata
        except MlflowException as error:
            raise UserError(f"cannot read version {version} of {name}: "
                            f"{str(error.message).splitlines()[0]}") from None
        tasks[version] = tuple((metadata or {}).get("class_names", ()))
    if len(set(tasks.values())) > 1:
        described = ", ".join(f"version {version}: {'/'.join(task) or 'unknown classes'}"
                              for version, task in tasks.items())
        raise UserError(f"not comparable: the versions solve different tasks ({described}); "
                        "promote without if_better, or compare models of one task")


def _evaluate_all(config: PromoteConfig, versions: list[str], progress: bool) -> dict[str, Run]:
    """Evaluate each version on `evaluate_on` (reusing finished evaluations of the same files),
    as child runs of one promote run that records the decision's evidence."""
    defaults = EvaluateConfig()
    labelled = read_labelled_set(config.evaluate_on, defaults.cache_dir, progress)
    evidence = {}
    with mlflow_run.tracked_run(defaults.experiment_name,
                                run_name=f"promote-{config.name}-v{config.version}"):
        for version in versions:
            found = find_evaluations(config.name, version, labelled.fingerprint)
            if found:
                print(f"version {version}: reusing evaluation run {found[0].info.run_id}")
                evidence[version] = found[0]
                continue
            outcome = evaluate_model(
                EvaluateConfig(model_uri=f"models:/{config.name}/{version}",
                               data_dir=config.evaluate_on), progress, labelled, nested=True)
            evidence[version] = MlflowClient().get_run(outcome.run_id)
        mlflow.set_tags({FINGERPRINT_TAG: labelled.fingerprint,
                         "promote_candidate": config.version,
                         "promote_against": ",".join(versions[1:])})
    return evidence


def _existing_evidence(name: str, versions: list[str]) -> dict[str, Run]:
    """The newest evaluations of all versions on one common data fingerprint."""
    runs = {version: find_evaluations(name, version) for version in versions}
    fingerprints = [{run.data.tags[FINGERPRINT_TAG] for run in found} for found in runs.values()]
    common = set.intersection(*fingerprints)
    if not common:
        raise UserError(
            f"not comparable: versions {' and '.join(versions)} of {name} have no evaluation "
            "on the same data (each version's own test split is different data); add "
            "-P evaluate_on=PATH (a labelled SIIM-layout set) to evaluate them all on it")
    # The common set the candidate was evaluated on most recently (runs come newest first).
    fingerprint = next(run.data.tags[FINGERPRINT_TAG] for run in runs[versions[0]]
                       if run.data.tags[FINGERPRINT_TAG] in common)
    return {version: next(run for run in found if run.data.tags[FINGERPRINT_TAG] == fingerprint)
            for version, found in runs.items()}


def find_evaluations(name: str, version: str, fingerprint: str | None = None) -> list[Run]:
    """Finished evaluation runs of a model version (on one data fingerprint), newest first."""
    conditions = [f"tags.{MODEL_NAME_TAG} = '{name}'", f"tags.{MODEL_VERSION_TAG} = '{version}'",
                  "attributes.status = 'FINISHED'"]
    if fingerprint:
        conditions.append(f"tags.{FINGERPRINT_TAG} = '{fingerprint}'")
    return mlflow.search_runs(filter_string=" and ".join(conditions), output_format="list",
                              search_all_experiments=True,
                              order_by=["attributes.start_time DESC"])


def _score(run: Run, metric: str, version: str) -> tuple[float, tuple[float, float]]:
    """(value, (ci_low, ci_high)) of `metric` in an evaluation run."""
    values = run.data.metrics
    if metric not in values:
        known = sorted(key.removeprefix("eval_") for key in values
                       if key.startswith("eval_") and "_ci_" not in key)
        raise UserError(f"version {version}'s evaluation has no {metric} "
                        f"(it has {', '.join(known) or 'none'})")
    value = values[metric]
    return value, (values.get(f"{metric}_ci_low", value), values.get(f"{metric}_ci_high", value))


def _show(score: tuple[float, tuple[float, float]]) -> str:
    value, (low, high) = score
    return f"{value:.4f} (95% CI {low:.4f}-{high:.4f})"
