"""External validation: a registered model scored on any labelled SIIM-layout set (another
hospital's data, say), the way medical-imaging papers report it.

Every usable study counts (no split): the model's own task decides the labels (binary or
4-class), its own stored preprocessing reads the films, and the numbers come with 95%
bootstrap intervals and calibration (`evaluation.evaluate`, the code train uses for its test
split). Each evaluation is its own MLflow run, tagged with the model version and the data's
fingerprint, so `promote` can later find evidence that is comparable.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from tqdm import tqdm

from covid_xray import mlflow_run, registry
from covid_xray.cache import CacheParams, ImageCache
from covid_xray.config import EvaluateConfig
from covid_xray.data import CLASS_NAMES, DOWNLOAD_HINT, find_studies
from covid_xray.decoding import decoded_batches
from covid_xray.errors import UserError
from covid_xray.evaluation import Evaluation, evaluate
from covid_xray.files import atomic_write

# Tags that make an evaluation findable: which model, which data.
MODEL_NAME_TAG, MODEL_VERSION_TAG = "eval_model_name", "eval_model_version"
FINGERPRINT_TAG, TASK_TAG = "eval_data_fingerprint", "eval_task"


@dataclass
class ExternalEvaluation:
    run_id: str
    fingerprint: str
    evaluation: Evaluation
    predictions: pd.DataFrame  # one row per study: ids, truth, probabilities, error


@dataclass
class LabelledSet:
    """A labelled SIIM-layout folder: its usable studies and the fingerprint of them."""

    data_dir: Path
    studies: pd.DataFrame  # study_id, siim_class, image_id, path
    fingerprint: str
    dropped_multi_image: int
    dropped_missing_file: int


def read_labelled_set(data_dir: str | Path, cache_dir: str | Path,
                      progress: bool = True) -> LabelledSet:
    """Find the set's usable studies and fingerprint them: a hash of every study id, its SIIM
    class and its file's bytes. It does not depend on any model, so two models scored on the
    same files share it, which is what makes their numbers comparable."""
    found = find_studies(data_dir)
    if found.studies.empty:
        raise UserError(f"{data_dir}: no labelled study has exactly one DICOM; {DOWNLOAD_HINT}")
    studies = found.studies.sort_values("study_id", ignore_index=True)
    memo = ImageCache(cache_dir, CacheParams(0))  # only its remembered file digests are used
    hasher = hashlib.blake2b(digest_size=16)
    for row in tqdm(studies.itertuples(index=False), total=len(studies), disable=not progress,
                    desc="fingerprinting", leave=False):
        digest = memo.content_digest(Path(data_dir) / row.path)
        hasher.update(f"{row.study_id},{row.siim_class},{digest}\n".encode())
    return LabelledSet(Path(data_dir), studies, hasher.hexdigest(), len(found.multi_image),
                       len(found.missing_files))


def task_labels(siim_class: pd.Series, class_names: tuple[str, ...]) -> np.ndarray:
    """SIIM's classes as the model's task sees them."""
    if class_names == CLASS_NAMES[2]:
        return (siim_class > 0).astype(int).to_numpy()
    if class_names == CLASS_NAMES[4]:
        return siim_class.to_numpy()
    raise UserError(f"the model's classes {list(class_names)} are not a SIIM task "
                    f"({list(CLASS_NAMES[2])} or {list(CLASS_NAMES[4])})")


def evaluate_model(config: EvaluateConfig, progress: bool = True,
                   labelled: LabelledSet | None = None, nested: bool = False
                   ) -> ExternalEvaluation:
    """Score `config.model_uri` on `config.data_dir`; log one MLflow run (a child of the
    active run when `nested`: promote's evidence); return it all."""
    mlflow_run.check_tracking_server()
    # The alias (or stage) is resolved once, and that exact version is loaded: resolved twice,
    # a move in between would tag the run with a version it never scored.
    version = registry.resolve_version(config.model_uri)
    model = registry.load(f"models:/{version.name}/{version.version}" if version
                          else config.model_uri)
    class_names = tuple(model.class_names)
    labelled = labelled or read_labelled_set(config.data_dir, config.cache_dir, progress)
    studies = labelled.studies
    truth = task_labels(studies.siim_class, class_names)

    frames = []
    paths = [str(labelled.data_dir / path) for path in studies.path]
    batches = decoded_batches(paths, model.preprocessing, config.batch_size,
                              config.num_workers)
    for inputs, errors in tqdm(batches, total=-(-len(paths) // config.batch_size),
                               desc="evaluating", unit="batch", disable=not progress):
        frames.append(model.result_frame(model.probabilities(inputs), errors))
    predictions = pd.concat(frames, ignore_index=True).rename(columns={"label": "predicted"})
    predictions.insert(0, "study_id", studies.study_id)
    predictions.insert(1, "image_id", studies.image_id)
    predictions.insert(2, "path", studies.path)
    predictions.insert(3, "truth", [class_names[value] for value in truth])
    scored = (predictions.error == "").to_numpy()
    if not scored.any():
        raise UserError(f"none of the {len(scored)} studies in {labelled.data_dir} could be "
                        f"read; first error: {predictions.error.iloc[0]}")
    probability_columns = [f"prob_{name}" for name in class_names]
    evaluation = evaluate(truth[scored], predictions.loc[scored, probability_columns].to_numpy(),
                          class_names, resamples=config.resamples, seed=config.seed,
                          title="external")

    model_name = version.name if version else ""
    model_version = str(version.version) if version else ""
    run_name = f"evaluate-{model_name}-v{model_version}" if version else "evaluate"
    with mlflow_run.tracked_run(config.experiment_name, run_name=run_name, nested=nested) as run:
        mlflow.set_tags({"model_uri": config.model_uri, MODEL_NAME_TAG: model_name,
                         MODEL_VERSION_TAG: model_version,
                         FINGERPRINT_TAG: labelled.fingerprint,
                         TASK_TAG: ",".join(class_names)})
        counts = {"count/studies": len(studies), "count/scored": int(scored.sum()),
                  "count/unreadable": int((~scored).sum()),
                  "count/dropped_multi_image": labelled.dropped_multi_image,
                  "count/dropped_missing_file": labelled.dropped_missing_file}
        counts |= {f"count/{name}": int((truth[scored] == index).sum())
                   for index, name in enumerate(class_names)}
        mlflow_run.log_params({"model_uri": config.model_uri, "data_dir": str(config.data_dir),
                               "resamples": config.resamples, "seed": config.seed,
                               "data_fingerprint": labelled.fingerprint} | counts)
        dataset = mlflow_run.log_dataset(predictions[["study_id", "image_id", "path", "truth"]],
                                         labelled.data_dir, labelled.fingerprint,
                                         name=f"external-{labelled.data_dir.resolve().name}",
                                         context="evaluation")
        model_id = registry.logged_model_id(version) if version else None
        mlflow_run.log_evaluation(evaluation, "eval", model_id=model_id, dataset=dataset)
        csv = predictions.to_csv(index=False)
        mlflow.log_text(csv, "predictions.csv")
        if config.output:
            atomic_write(Path(config.output), lambda file: file.write(csv.encode()))

    described = f"{model_name} version {model_version}" if version else config.model_uri
    unreadable = int((~scored).sum())
    print(f"evaluated {described} on {int(scored.sum())} studies of {labelled.data_dir}"
          + (f" ({unreadable} unreadable, listed in predictions.csv)" if unreadable else "")
          + f": run {run.info.run_id}")
    keys = ["roc_auc", "accuracy", "balanced_accuracy", "map", "ece", "brier"]
    keys += ["sensitivity", "specificity"] if len(class_names) == 2 else []
    for key in keys:
        print(f"  {evaluation.line(key)}")
    return ExternalEvaluation(run.info.run_id, labelled.fingerprint, evaluation, predictions)
