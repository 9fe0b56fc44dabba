"""Promotion on comparable evidence: a candidate replaces the holders of a stage or alias only
when it beats each of them on the same studies, for the same task, by more than chance.

Each version's own test split is different data (other studies, another seed, maybe another
task), so comparing those numbers compares luck. Here the evidence is `evaluate` runs (see
serving/evaluate.py) that share a data fingerprint, each with its per-study predictions;
`evaluate_on` makes that evidence first, reusing any evaluation of the same version on the
same files. The decision is paired: the same bootstrap resamples of the studies score both
models, and the candidate wins only when the 95% interval of the difference clears
`min_delta`. Two separate intervals would treat two answers to the same films as independent,
and a bare point difference promotes on noise. Without comparable evidence nothing moves, and
the one-line error says how to get it. Each decision is a run of its own holding the evidence.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from covid_xray.config import EvaluateConfig, PromoteConfig
from covid_xray.errors import UserError, first_line
from covid_xray.evaluation.report import PairedDifference, paired_difference
from covid_xray.serving.evaluate import (
    FINGERPRINT_TAG,
    MODEL_NAME_TAG,
    MODEL_VERSION_TAG,
    evaluate_model,
    read_labelled_set,
)
from covid_xray.tracking import mlflow_run, registry
from covid_xray.tracking.registry import Promotion

HIGHER_IS_BETTER = ("roc_auc", "accuracy", "balanced_accuracy", "map", "sensitivity",
                    "specificity")
LOWER_IS_BETTER = ("ece", "brier")


def better_sign(metric: str) -> int:
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
        return _recorded(config, registry.promote(config.name, config.version,
                                                  stage=config.stage, alias=config.alias))
    sign = better_sign(config.if_better)
    client = MlflowClient()
    candidate = registry.get_version(client, config.name, config.version)
    holders = [holder for holder in registry.holders(client, config.name, config.stage,
                                                     config.alias)
               if holder.version != candidate.version]
    if not holders:  # nothing to beat
        return _recorded(config, registry.promote(config.name, config.version,
                                                  stage=config.stage, alias=config.alias))
    versions = [str(candidate.version), *dict.fromkeys(str(holder.version) for holder in holders)]
    class_names, thresholds = _check_same_task(config.name, versions)
    defaults = EvaluateConfig()
    with mlflow_run.tracked_run(defaults.experiment_name,
                                run_name=f"promote-{config.name}-v{config.version}"):
        if config.evaluate_on:
            evidence = _evaluate_all(config, versions, progress)
        else:
            evidence = _existing_evidence(config.name, versions)
        fingerprint = next(iter(evidence.values())).data.tags[FINGERPRINT_TAG]
        mlflow.set_tags({FINGERPRINT_TAG: fingerprint, "promote_candidate": config.version,
                         "promote_against": ",".join(versions[1:])})
        mlflow_run.log_params({"if_better": config.if_better, "min_delta": config.min_delta,
                               "resamples": defaults.resamples})
        answers = {version: _predictions(run, version) for version, run in evidence.items()}
        comparisons = []
        for version in versions[1:]:
            paired = _compare(answers[versions[0]], answers[version], class_names,
                              config.if_better, defaults,
                              (thresholds[versions[0]], thresholds[version]))
            mlflow.log_metrics({f"delta_{paired.metric}_vs_v{version}": paired.difference,
                                f"delta_{paired.metric}_vs_v{version}_ci_low": paired.ci_low,
                                f"delta_{paired.metric}_vs_v{version}_ci_high":
                                    paired.ci_high})
            comparison = (f"version {versions[0]} vs version {version}: {paired.line()} of the "
                          f"same data ({fingerprint[:12]})")
            why = _shortfall(paired, sign, config.min_delta, versions[0])
            if why:
                decision = f"not promoted: {comparison}; {why}"
                mlflow.set_tag("promote_decision", "not promoted")
                mlflow.log_text(decision + "\n", "decision.txt")
                return Promotion(False, decision)
            comparisons.append(comparison)
        moved = registry.promote(config.name, config.version, stage=config.stage,
                                 alias=config.alias)
        decision = f"{moved.message} ({'; '.join(comparisons)})"
        mlflow.set_tag("promote_decision", "promoted")
        mlflow.log_text(decision + "\n", "decision.txt")
    return Promotion(True, decision)


def _shortfall(paired: PairedDifference, sign: int, min_delta: float, candidate: str) -> str:
    """Why the paired difference does not carry the candidate ("" when it does): the
    interval's bound on the candidate's side must clear `min_delta`."""
    bound = paired.ci_low if sign > 0 else -paired.ci_high
    if bound > min_delta:
        return ""
    if paired.ci_low <= 0 <= paired.ci_high:
        return "the interval includes 0, so the difference may be chance"
    if sign * paired.difference > 0:
        return f"the interval does not clear min_delta {min_delta:g}"
    return f"version {candidate} is not better"


def _recorded(config: PromoteConfig, promotion: Promotion) -> Promotion:
    """A move made without a comparison, as a run of its own: what moved, and why no
    evidence was asked for."""
    with mlflow_run.tracked_run(EvaluateConfig().experiment_name,
                                run_name=f"promote-{config.name}-v{config.version}"):
        mlflow.set_tags({"promote_candidate": config.version,
                         "promote_decision": "promoted" if promotion.promoted else "unchanged"})
        mlflow_run.log_params({"name": config.name, "version": config.version,
                               "alias": config.alias, "stage": config.stage,
                               "if_better": config.if_better})
        mlflow.log_text(promotion.message + "\n", "decision.txt")
    return promotion


def _predictions(run: Run, version: str) -> pd.DataFrame:
    """The per-study answers an evaluation run logged (predictions.csv)."""
    try:
        path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                   artifact_path="predictions.csv")
    except (MlflowException, OSError):
        raise UserError(f"version {version}'s evaluation run {run.info.run_id} has no "
                        "predictions.csv (it predates paired promotion); add -P "
                        "evaluate_on=PATH to evaluate the versions again") from None
    return pd.read_csv(Path(path), dtype={"study_id": str}, keep_default_na=False)


def _compare(candidate: pd.DataFrame, holder: pd.DataFrame, class_names: tuple[str, ...],
             metric: str, defaults: EvaluateConfig,
             thresholds: tuple[float | None, float | None]) -> PairedDifference:
    """The candidate's metric minus the holder's, on the studies both could score, each
    calling classes at its own stored threshold."""
    both = candidate.merge(holder, on=["study_id", "truth"], suffixes=("", "_holder"))
    both = both[(both.error == "") & (both.error_holder == "")]
    if both.empty:
        raise UserError("not comparable: the two evaluations share no scored study")
    columns = [f"prob_{name}" for name in class_names]
    labels = both.truth.map({name: index for index, name in enumerate(class_names)})
    return paired_difference(
        labels.to_numpy(), both[columns].to_numpy(dtype=np.float64),
        both[[f"{column}_holder" for column in columns]].to_numpy(dtype=np.float64),
        class_names, metric, resamples=defaults.resamples, seed=0,
        thresholds=thresholds)


def _check_same_task(name: str, versions: list[str]
                     ) -> tuple[tuple[str, ...], dict[str, float | None]]:
    """A 2-class and a 4-class model answer different questions: no number compares them.
    Returns the task's classes and each version's stored threshold."""
    tasks, thresholds = {}, {}
    for version in versions:
        try:
            metadata = mlflow.models.get_model_info(f"models:/{name}/{version}").metadata
        except MlflowException as error:
            raise UserError(f"cannot read version {version} of {name}: "
                            f"{first_line(error)}") from None
        tasks[version] = tuple((metadata or {}).get("class_names", ()))
        thresholds[version] = (metadata or {}).get("threshold")
    if len(set(tasks.values())) > 1:
        described = ", ".join(f"version {version}: {'/'.join(task) or 'unknown classes'}"
                              for version, task in tasks.items())
        raise UserError(f"not comparable: the versions solve different tasks ({described}); "
                        "promote without if_better, or compare models of one task")
    return tasks[versions[0]], thresholds


def _evaluate_all(config: PromoteConfig, versions: list[str], progress: bool) -> dict[str, Run]:
    """Evaluate each version on `evaluate_on` (reusing finished evaluations of the same files),
    as child runs of the promote run that records the decision's evidence."""
    defaults = EvaluateConfig()
    labelled = read_labelled_set(config.evaluate_on, defaults.cache_dir, progress)
    evidence = {}
    for version in versions:
        found = find_evaluations(config.name, version, labelled.fingerprint)
        if found:
            print(f"version {version}: reusing evaluation run {found[0].info.run_id}")
            evidence[version] = found[0]
            continue
        outcome = evaluate_model(
            EvaluateConfig(model_uri=f"models:/{config.name}/{version}",
                           data_dir=config.evaluate_on, overlap=config.overlap), progress,
            labelled, nested=True)
        evidence[version] = MlflowClient().get_run(outcome.run_id)
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
