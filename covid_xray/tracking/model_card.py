"""A model card per registered version: what the model is for, what it was trained on, how
well it does with what uncertainty, where it fails, and what it must not be used for.

Written as Markdown into the version's description (the registry UI shows it) and logged as
`model_card.md`, from what the tracking server already holds: the training run's params,
counts and test metrics, the operating point stored in the model, the test subgroup table,
and every finished evaluation of the version (rewritten when evaluate adds one). The
registry keeps at most 5,000 characters of description; a longer card is cut there, and the
logged file stays whole.
"""

from __future__ import annotations

import io
from datetime import UTC, datetime

import mlflow
import pandas as pd
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from covid_xray.tracking.mlflow_run import (
    EVALUATED_NAME_TAG,
    EVALUATED_VERSION_TAG,
    shareable_path,
)

DESCRIPTION_LIMIT = 5000  # MLflow's model version description column
CARD_ARTIFACT = "model_card.md"
HEADLINE = ("roc_auc", "sensitivity", "specificity", "balanced_accuracy", "map", "ece",
            "ece_uncalibrated", "brier")


def model_card(name: str, version: str) -> str:
    """The card of `name` version `version`, as Markdown."""
    client = MlflowClient()
    run = client.get_run(client.get_model_version(name, version).run_id)
    spec = mlflow.models.get_model_info(f"models:/{name}/{version}").metadata or {}
    lines = [f"# Model card: {name} version {version}", "",
             "**Not for diagnostic use.** Research software: it has not been validated for "
             "clinical decisions and must not be used for them.",
             *_intended_use(spec.get("class_names", [])),
             *_data(run.data.params, spec),
             *_model(run, spec),
             "", "## Performance on the held-out test split (95% bootstrap CIs)",
             *_metric_lines(run.data.metrics, "test"),
             *_subgroup_summary(run),
             *_evaluation_lines(name, version),
             *LIMITATIONS]
    return "\n".join(lines) + "\n"


def _intended_use(classes: list[str]) -> list[str]:
    task = ("negative vs opacity: any pneumonia-type opacity (SIIM's typical, indeterminate "
            "and atypical-for-COVID-19 appearances together); not a COVID-19 test"
            if len(classes) == 2 else f"SIIM's four study-level classes ({', '.join(classes)})")
    return ["", "## Intended use",
            f"- Task: {task}, from one frontal chest radiograph (DICOM CR/DX).",
            "- Users: machine-learning engineers and researchers comparing chest X-ray models; "
            "not clinicians, not patients.",
            "- Inputs it refuses (input gate): other modalities, lateral views, other body "
            "parts, colour images, unreadable files; each with a reason code. Films far from "
            "its training films get no label (out_of_distribution)."]


def _data(params: dict[str, str], spec: dict) -> list[str]:
    """What it learned from. The data folder by its name only: a card is read on other
    machines, and this one's paths are nobody's business there."""
    counts = {key.removeprefix("count/"): value for key, value in params.items()
              if key.startswith("count/")}
    prevalence = ", ".join(f"{name} {share:.0%}" for name, share in
                           zip(spec.get("class_names", []), spec.get("training_prevalence", []),
                               strict=False))
    return [
        "", "## Data",
        f"- Source: the folder `{shareable_path(params.get('data_dir', '?'))}` (SIIM-FISABIO-RSNA "
        f"COVID-19 Detection layout), fingerprint `{params.get('data_fingerprint', '?')}`.",
        f"- Studies: {_split_counts(counts)}; {counts.get('patients', '?')} patients, split "
        f"by patient ({params.get('split', '?')}, seed {params.get('seed', '?')}), repeated "
        "films kept once.",
        f"- Class balance: {params.get('balance', '?')}; training prevalence: "
        f"{prevalence or '?'}.",
        f"- Left out: {counts.get('dropped_multi_image', '?')} studies with several images, "
        f"{counts.get('dropped_by_gate', '0')} the input gate refuses, "
        f"{counts.get('dropped_unreadable', '0')} unreadable."]


def _model(run: Run, spec: dict) -> list[str]:
    params, metrics = run.data.params, run.data.metrics
    return [
        "", "## Model",
        f"- DenseNet (`model={spec.get('architecture', '?')}`) at {spec.get('img_size', '?')} px, "
        f"{spec.get('normalization', '?')} normalisation; trained {params.get('epochs', '?')} "
        f"epochs max, best epoch {metrics.get('best_epoch', float('nan')):.0f}; run "
        f"`{run.info.run_id}`, commit `{run.data.tags.get('git_commit', '?')}`.",
        f"- Calibration: temperature {spec.get('temperature', 1.0):.3f}, fitted on the val "
        "split.",
        f"- Out of distribution beyond a feature distance of "
        f"{metrics.get('ood_threshold', float('nan')):.1f} (99th percentile of val); "
        f"{metrics.get('test_ood_rate', float('nan')):.1%} of test films.",
        (f"- Operating point: opacity when P(opacity) >= {spec['threshold']:.4f} "
         f"({spec.get('operating_point')} on the val split)." if spec.get("threshold")
         is not None else "- Operating point: the most probable class.")]


def _subgroup_summary(run: Run) -> list[str]:
    subgroups = _subgroups(run)
    if subgroups is None:
        return []
    scored = subgroups.dropna(subset=["roc_auc"])
    # Read from CSV: True, False or empty; only a True is a flag.
    below = pd.Series(scored.get("auc_below_overall", False), index=scored.index)
    flagged = scored[below.astype(str) == "True"]
    named = ", ".join(f"{row.attribute}={row.value}" for row in flagged.itertuples())
    return ["", "## Subgroups (test split)",
            f"{len(scored)} of {len(subgroups)} subgroups had >= 30 studies and both classes; "
            f"AUC below the overall AUC (Holm-adjusted across them, p < 0.05): "
            f"{named or 'none'}. Full table: "
            "`subgroups.csv` in the training run."]


def _evaluation_lines(name: str, version: str) -> list[str]:
    evaluations = _evaluations(name, version)
    lines = ["", "## Evaluations"]
    if not evaluations:
        lines.append("None yet: `mlflow run . -e evaluate -P data_dir=PATH` (data it never "
                     "learned from) adds one here.")
    for evaluation in evaluations:
        when = datetime.fromtimestamp(evaluation.info.start_time / 1000, UTC).date()
        data = evaluation.data.params.get("data_dir", "").strip("'\"")
        data = f"the folder `{shareable_path(data)}`" if data else "its own test split, rescored"
        lines.append(f"- {when}, {data} ({evaluation.data.params.get('count/scored', '?')} "
                     f"studies), run `{evaluation.info.run_id}`:")
        lines += [f"  {line}" for line in _metric_lines(evaluation.data.metrics, "eval")[:3]]
    return lines


LIMITATIONS = [
    "", "## Known limitations",
    "- Labels are per study, from one competition's readers; single-image studies only.",
    "- Probabilities are calibrated to the training prevalence; other clinics need a "
    "prior-shift correction (docs/evaluation.md).",
    "- Small subgroups are reported by count only; untested populations (children, "
    "other devices and sites) may do worse.",
    "", "## Reporting checklists",
    "Covers, from CLAIM and TRIPOD+AI: data source and eligibility, patient-level "
    "partitions, reference standard (SIIM study labels), model description, performance "
    "with confidence intervals, calibration, subgroup (fairness) analysis, intended use "
    "and limitations. Not covered: prospective or clinical validation.",
]


def write_model_card(name: str, version: str, run_id: str | None = None) -> str:
    """Put the card in the version's description and log it as `model_card.md` to `run_id`
    (the training run, or the evaluation that added evidence); return it."""
    card = model_card(name, version)
    description = card
    if len(description) > DESCRIPTION_LIMIT:
        tail = "\n\n(cut here: the whole card is model_card.md in the run)\n"
        description = card[: DESCRIPTION_LIMIT - len(tail)] + tail
    MlflowClient().update_model_version(name, version, description=description)
    if run_id:
        MlflowClient().log_text(run_id, card, CARD_ARTIFACT)
    return card


def _split_counts(counts: dict[str, str]) -> str:
    splits = {}
    for key, value in counts.items():
        split, _, class_name = key.partition("/")
        if class_name and split in ("train", "val", "test"):
            splits.setdefault(split, []).append(f"{value} {class_name}")
    return "; ".join(f"{split} {', '.join(parts)}" for split, parts in splits.items()) or "?"


def _metric_lines(metrics: dict[str, float], prefix: str) -> list[str]:
    lines = []
    for name in HEADLINE:
        value = metrics.get(f"{prefix}_{name}")
        if value is None:
            continue
        low, high = metrics.get(f"{prefix}_{name}_ci_low"), metrics.get(f"{prefix}_{name}_ci_high")
        interval = f" (95% CI {low:.3f}-{high:.3f})" if low is not None else ""
        lines.append(f"- {name}: {value:.3f}{interval}")
    return lines


def _subgroups(run: Run) -> pd.DataFrame | None:
    try:
        text = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/subgroups.csv")
    except (MlflowException, OSError):
        return None
    return pd.read_csv(io.StringIO(text))


def _evaluations(name: str, version: str) -> list[Run]:
    return mlflow.search_runs(
        filter_string=f"tags.{EVALUATED_NAME_TAG} = '{name}' and "
                      f"tags.{EVALUATED_VERSION_TAG} = '{version}' and "
                      "attributes.status = 'FINISHED'",
        search_all_experiments=True, output_format="list",
        order_by=["attributes.start_time DESC"])
