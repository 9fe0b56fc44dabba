"""External validation: a registered model scored on any labelled SIIM-layout set (another
hospital's data, say), the way medical-imaging papers report it.

Every usable study counts (no split), except those the model was trained or validated on
(tracking/manifests.py): those are refused, or left out with overlap=drop. Without a data_dir
the model's own logged test split is scored again. The model's own task decides the labels
(binary or 4-class), its own stored preprocessing reads the films, and the numbers come with
95% bootstrap intervals and calibration (`evaluation.evaluate`, the code train uses for its
test split). Each evaluation is its own MLflow run, tagged with the model version and the
data's fingerprint, so `promote` can later find evidence that is comparable.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient
from tqdm import tqdm

from covid_xray.config import OVERLAP_RULES, EvaluateConfig
from covid_xray.data.studies import (
    CLASS_NAMES,
    DOWNLOAD_HINT,
    find_studies,
    without_placeholders,
)
from covid_xray.errors import UserError
from covid_xray.evaluation.report import Evaluation, evaluate
from covid_xray.evaluation.subgroups import add_subgroups
from covid_xray.files import atomic_write
from covid_xray.imaging.cache import CacheParams, ImageCache, load_entry, square_digest
from covid_xray.imaging.likeness import NEAR_DUPLICATE, SIDE, nearest_distance, thumbnail
from covid_xray.imaging.workers import worker_count
from covid_xray.model.pyfunc import DicomClassifier
from covid_xray.pseudonyms import (
    cached_key_fingerprints,
    key_fingerprint,
    key_source,
    pseudonym_key,
)
from covid_xray.tracking import mlflow_run, registry
from covid_xray.tracking.manifests import (
    KEY_FINGERPRINT_TAG,
    learned,
    learned_from,
    logged_data_dir,
    logged_manifest,
    logged_thumbnails,
)
from covid_xray.tracking.model_card import write_model_card

# What the binary classes were called before they were named for what they are.
LEGACY_BINARY = ("negative", "positive")
# Tags that make an evaluation findable: which model, which data.
MODEL_NAME_TAG = mlflow_run.EVALUATED_NAME_TAG
MODEL_VERSION_TAG = mlflow_run.EVALUATED_VERSION_TAG
FINGERPRINT_TAG, TASK_TAG = "eval_data_fingerprint", "eval_task"


@dataclass
class ExternalEvaluation:
    run_id: str
    fingerprint: str
    evaluation: Evaluation
    predictions: pd.DataFrame  # one row per study: ids, truth, probabilities, error


@dataclass
class LabelledSet:
    """Labelled SIIM-layout studies: the usable ones of a folder (or a chosen part of them)
    and the fingerprint of exactly those."""

    data_dir: Path
    studies: pd.DataFrame  # study_id, siim_class, image_id, path, file_digest
    fingerprint: str
    dropped_multi_image: int = 0
    dropped_missing_file: int = 0

    def without(self, drop: np.ndarray) -> LabelledSet:
        """The same set less the studies marked in `drop`, fingerprinted anew."""
        kept = self.studies[~drop].reset_index(drop=True)
        return LabelledSet(self.data_dir, kept, fingerprint_of(kept),
                           self.dropped_multi_image, self.dropped_missing_file)


def fingerprint_of(studies: pd.DataFrame) -> str:
    """A hash of every study id, its SIIM class and its file's bytes. It does not depend on
    any model, so two models scored on the same files share it, which is what makes their
    numbers comparable."""
    hasher = hashlib.blake2b(digest_size=16)
    for row in studies.itertuples(index=False):
        hasher.update(f"{row.study_id},{row.siim_class},{row.file_digest}\n".encode())
    return hasher.hexdigest()


def read_labelled_set(data_dir: str | Path, cache_dir: str | Path, progress: bool = True,
                      study_ids: pd.Series | None = None) -> LabelledSet:
    """Find the set's usable studies (only `study_ids`, when given), digest their files and
    fingerprint them."""
    found = find_studies(data_dir)
    studies = found.studies.sort_values("study_id", ignore_index=True)
    if study_ids is not None:
        studies = studies[studies.study_id.isin(study_ids)].reset_index(drop=True)
    if studies.empty:
        raise UserError(f"{data_dir}: no labelled study has exactly one DICOM; {DOWNLOAD_HINT}")
    memo = ImageCache(cache_dir, CacheParams(0))  # only its remembered file digests are used
    digests = [memo.content_digest(Path(data_dir) / path) for path in
               tqdm(studies.path, disable=not progress, desc="fingerprinting", leave=False)]
    studies = studies.assign(file_digest=digests)
    return LabelledSet(Path(data_dir), studies, fingerprint_of(studies),
                       len(found.multi_image), len(found.missing_files))


def task_labels(siim_class: pd.Series, class_names: tuple[str, ...]) -> np.ndarray:
    """SIIM's classes as the model's task sees them."""
    if class_names in (CLASS_NAMES[2], LEGACY_BINARY):
        return (siim_class > 0).astype(int).to_numpy()
    if class_names == CLASS_NAMES[4]:
        return siim_class.to_numpy()
    raise UserError(f"the model's classes {list(class_names)} are not a SIIM task "
                    f"({list(CLASS_NAMES[2])} or {list(CLASS_NAMES[4])})")


def own_test_split(run_id: str, manifest: pd.DataFrame | None, cache_dir: str,
                   progress: bool) -> LabelledSet:
    """The test split the model's training run logged, read from the folder it trained on
    (its `data_dir`, from the current folder when relative: the record keeps no absolute
    path) and checked file by file against the manifest's digests."""
    data_dir = logged_data_dir(run_id)
    if manifest is None or data_dir is None:
        raise UserError(f"the model's run {run_id} logged no manifest of its splits, so its "
                        "test split is unknown; give data_dir (a labelled SIIM-layout set it "
                        "never saw)")
    test = manifest[manifest.split == "test"]
    if not data_dir.is_dir():
        raise UserError(f"the model was trained on the folder {data_dir.name}, which is not "
                        f"at {data_dir}; run from the folder training ran in, or give data_dir "
                        "(a labelled SIIM-layout set it never saw)")
    labelled = read_labelled_set(data_dir, cache_dir, progress, study_ids=test.study_id)
    missing = len(test) - len(labelled.studies)
    changed = 0
    if "file_digest" in test and not missing:
        logged = dict(zip(test.study_id, test.file_digest, strict=True))
        changed = int(sum(logged[study] != digest for study, digest in
                          zip(labelled.studies.study_id, labelled.studies.file_digest,
                              strict=True)))
    if missing or changed:
        raise UserError(f"{missing or changed} of the {len(test)} test studies of run {run_id} "
                        f"are {'no longer' if missing else 'other files'} in {data_dir}; "
                        "give data_dir instead")
    return labelled


def check_overlap(labelled: LabelledSet, manifest: pd.DataFrame | None, run_id: str | None,
                  model: DicomClassifier, config: EvaluateConfig, progress: bool
                  ) -> tuple[LabelledSet, int]:
    """Refuse (or with overlap=drop, leave out) studies the model was trained or validated
    on: the same study, image, file or pixels, the same patient (a follow-up study), or a
    near-duplicate of a training film; returns the set to score and how many were dropped."""
    if config.overlap not in OVERLAP_RULES:
        raise UserError(f"overlap must be {' or '.join(OVERLAP_RULES)}, got {config.overlap!r}")
    if manifest is None:
        print("warning: the model's run logged no manifest of its training data, so overlap "
              "with it cannot be checked")
        return labelled, 0
    paths = [labelled.data_dir / path for path in labelled.studies.path]
    patients = _patients(paths, run_id, config, progress)
    pixels = near_duplicates = None
    if "pixel_digest" in manifest:
        # The training cache's squares (same size and VOI rule): decoded once, then reused.
        cache = ImageCache(config.cache_dir, CacheParams(model.preprocessing.img_size,
                                                         model.preprocessing.apply_voi_lut))
        entries, stats = cache.build(paths, num_workers=worker_count(config.num_workers,
                                                                     len(paths)),
                                     progress=progress)
        pixels, thumbnails = [], []
        for path, entry in zip(paths, entries, strict=True):  # each square read once
            square = None if str(path) in stats.unreadable else load_entry(entry)
            pixels.append("" if square is None else square_digest(square))
            thumbnails.append(None if square is None else thumbnail(square))
        near_duplicates = _near_duplicates(thumbnails, manifest, run_id)
    found = learned_from(labelled.studies, manifest, pixels, patients, near_duplicates)
    overlap = np.logical_or.reduce(list(found.values()))
    count, total = int(overlap.sum()), len(overlap)
    # Studies whose PatientID names no one (blank, a placeholder, one on implausibly many
    # studies) could not be matched as a follow-up: only their films were compared.
    film_only = sum(not patient for patient in patients) if patients is not None else 0
    by_film = (f"; {film_only} of the {total} had no usable PatientID and were compared by "
               "film only") if film_only else ""
    if not count:
        if by_film:
            print(f"none of the {total} studies is one the model learned from{by_film}")
        return labelled, 0
    reasons = ", ".join(f"{int(mask.sum())} by {reason}" for reason, mask in found.items()
                        if mask.any()) + by_film
    if config.overlap != "drop":
        raise UserError(
            f"{count} of the {total} studies in {labelled.data_dir} are ones the model was "
            f"trained or validated on ({reasons}): scores on them would flatter it; evaluate "
            f"on other studies, set overlap=drop to score the {total - count} others, or "
            "leave data_dir empty to rescore its own test split")
    print(f"overlap=drop: left out {count} of {total} studies the model was trained or "
          f"validated on ({reasons})")
    return labelled.without(overlap), count


def _patients(paths: list[Path], run_id: str | None, config: EvaluateConfig,
              progress: bool) -> list[str] | None:
    """Each study's patient pseudonym under this machine's key, when that is the key the
    training run named its patients with; None when patients are not to be matched (asked,
    or a run that recorded no key). Another key refuses, in one line: its pseudonyms would
    match no one, and a follow-up study of a training patient would pass as unseen."""
    if config.overlap == "ignore_patients" or not run_id:
        return None
    recorded = MlflowClient().get_run(run_id).data.tags.get(KEY_FINGERPRINT_TAG)
    if not recorded:
        print("warning: the model's run recorded no pseudonym key, so its patients cannot be "
              "matched (studies, files and pixels are)")
        return None
    cache = ImageCache(config.cache_dir, CacheParams(0))
    here = key_fingerprint(pseudonym_key(config.cache_dir))
    if here != recorded:
        # A cache an earlier version kept its key in may still hold the one needed.
        found = cached_key_fingerprints(config.cache_dir).get(recorded)
        where = (f"; {found} holds it: set COVID_XRAY_PSEUDONYM_KEY to its contents, or "
                 f"copy it over that file") if found else (
            "; set COVID_XRAY_PSEUDONYM_KEY to the key that has it (the training machine's)")
        raise UserError(f"this machine's pseudonym key ({key_source()}, fingerprint {here}) is "
                        f"not the one the model's training named patients with (fingerprint "
                        f"{recorded}), so a training patient's new study cannot be "
                        f"recognised{where}, or overlap=ignore_patients to match studies, files "
                        "and pixels only")
    return without_placeholders(cache.patients(paths, progress)[0], say=progress)


def _near_duplicates(thumbnails: list[np.ndarray | None], manifest: pd.DataFrame,
                     run_id: str | None) -> np.ndarray | None:
    """Which films (their thumbnails; None for one that could not be decoded) are
    near-duplicates of a film the model learned from (imaging/likeness.py); None for a run
    that logged no thumbnails."""
    known = logged_thumbnails(run_id, learned(manifest).study_id) if run_id else None
    if known is None:
        return None
    readable = np.array([small is not None for small in thumbnails], dtype=bool)
    mine = np.stack([small if small is not None else np.zeros((SIDE, SIDE), np.float32)
                     for small in thumbnails])
    return (nearest_distance(mine, known) < NEAR_DUPLICATE) & readable


def evaluate_model(config: EvaluateConfig, progress: bool = True,
                   labelled: LabelledSet | None = None, nested: bool = False
                   ) -> ExternalEvaluation:
    """Score `config.model_uri` on `config.data_dir` (none: on the model's own logged test
    split); log one MLflow run (a child of the active run when `nested`: promote's
    evidence); return it all. Studies the model learned from are never scored."""
    mlflow_run.check_tracking_server()
    version, model = registry.load_resolved(config.model_uri)
    model.to_device(config.device)
    run_id = version.run_id if version else registry.run_id_of(config.model_uri)
    manifest = logged_manifest(run_id) if run_id else None
    labelled, seed, dropped_overlap = _studies_to_score(config, run_id, manifest, model,
                                                        labelled, progress)
    truth = task_labels(labelled.studies.siim_class, model.class_names)
    predictions = _predictions(model, labelled, truth, config, progress)
    evaluation = _evidence(model, labelled, predictions, truth, config, seed, progress)
    run_id_of_evaluation = _log_evaluation_run(config, version, model.class_names, labelled,
                                               predictions, evaluation, seed, dropped_overlap,
                                               nested)
    if version:  # the version's model card now lists this evidence too
        write_model_card(version.name, str(version.version), run_id=run_id_of_evaluation)
    _print_summary(config, version, model.class_names, labelled, predictions, evaluation,
                   run_id_of_evaluation)
    return ExternalEvaluation(run_id_of_evaluation, labelled.fingerprint, evaluation,
                              predictions)


def _studies_to_score(config: EvaluateConfig, run_id: str | None,
                      manifest: pd.DataFrame | None, model: DicomClassifier,
                      labelled: LabelledSet | None, progress: bool
                      ) -> tuple[LabelledSet, int, int]:
    """(the studies to score, the bootstrap seed, how many were dropped as learned from):
    `data_dir`'s less what the model learned from, or the model's own test split."""
    seed = config.seed
    if config.data_dir:
        labelled = labelled or read_labelled_set(config.data_dir, config.cache_dir, progress)
        labelled, dropped_overlap = check_overlap(labelled, manifest, run_id, model, config,
                                                  progress)
        return labelled, max(seed, 0), dropped_overlap
    labelled = own_test_split(run_id, manifest, config.cache_dir, progress)
    if seed < 0:  # the seed its training run bootstrapped the test split with
        seed = int(float(MlflowClient().get_run(run_id).data.params.get("seed", 0)))
    print(f"no data_dir: rescoring the model's own test split ({len(labelled.studies)} "
          f"studies of {labelled.data_dir}, as logged by run {run_id})")
    return labelled, max(seed, 0), 0


def _predictions(model: DicomClassifier, labelled: LabelledSet, truth: np.ndarray,
                 config: EvaluateConfig, progress: bool) -> pd.DataFrame:
    """One row per study: its ids, path, truth, and the model's answer (`predicted`)."""
    studies = labelled.studies
    paths = [str(labelled.data_dir / path) for path in studies.path]
    frames = [frame for _, frame in tqdm(
        model.answer_files(paths, config.batch_size, config.num_workers),
        total=-(-len(paths) // config.batch_size), desc="evaluating", unit="batch",
        disable=not progress)]
    predictions = pd.concat(frames, ignore_index=True).rename(columns={"label": "predicted"})
    predictions.insert(0, "study_id", studies.study_id)
    predictions.insert(1, "image_id", studies.image_id)
    predictions.insert(2, "path", studies.path)
    predictions.insert(3, "truth", [model.class_names[value] for value in truth])
    if (predictions.error != "").all():
        raise UserError(f"none of the {len(predictions)} studies in {labelled.data_dir} could "
                        f"be read; first error: {predictions.error.iloc[0]}")
    return predictions


def _evidence(model: DicomClassifier, labelled: LabelledSet, predictions: pd.DataFrame,
              truth: np.ndarray, config: EvaluateConfig, seed: int, progress: bool
              ) -> Evaluation:
    """The numbers on the studies that could be read, with their intervals, calibration and
    subgroup table (by the cached headers' sex, age band, view and manufacturer)."""
    scored = (predictions.error == "").to_numpy()
    class_names = tuple(model.class_names)
    probabilities = predictions.loc[scored, [f"prob_{name}" for name in class_names]].to_numpy()
    evaluation = evaluate(truth[scored], probabilities, class_names,
                          resamples=config.resamples, seed=seed, title="external",
                          threshold=model.threshold, temperature=model.operating.temperature)
    headers, _ = ImageCache(config.cache_dir, CacheParams(0)).headers(
        [labelled.data_dir / path for path in labelled.studies.path[scored]], progress)
    add_subgroups(evaluation, truth[scored], probabilities, class_names, headers,
                  threshold=model.threshold, resamples=config.resamples, seed=seed,
                  title="external")
    return evaluation


def _log_evaluation_run(config: EvaluateConfig, version, class_names: tuple[str, ...],
                        labelled: LabelledSet, predictions: pd.DataFrame,
                        evaluation: Evaluation, seed: int, dropped_overlap: int,
                        nested: bool) -> str:
    """The evaluation's own run: tags that make it findable (model version, data
    fingerprint, task), counts, the numbers linked to the version's logged model, and
    predictions.csv. Returns its id."""
    scored = (predictions.error == "").to_numpy()
    truth = predictions.truth[scored]
    model_name = version.name if version else ""
    model_version = str(version.version) if version else ""
    run_name = f"evaluate-{model_name}-v{model_version}" if version else "evaluate"
    with mlflow_run.tracked_run(config.experiment_name, run_name=run_name, nested=nested) as run:
        mlflow.set_tags({"model_uri": config.model_uri, MODEL_NAME_TAG: model_name,
                         MODEL_VERSION_TAG: model_version,
                         FINGERPRINT_TAG: labelled.fingerprint,
                         TASK_TAG: ",".join(class_names)})
        counts = {"count/studies": len(predictions), "count/scored": int(scored.sum()),
                  "count/unreadable": int((~scored).sum()),
                  "count/dropped_multi_image": labelled.dropped_multi_image,
                  "count/dropped_missing_file": labelled.dropped_missing_file,
                  "count/dropped_overlap": dropped_overlap}
        counts |= {f"count/{name}": int((truth == name).sum()) for name in class_names}
        mlflow_run.log_params({"model_uri": config.model_uri, "data_dir": str(config.data_dir),
                               "scored_data_dir": str(labelled.data_dir.resolve()),  # its name
                               "overlap": config.overlap, "resamples": config.resamples,
                               "seed": seed,
                               "data_fingerprint": labelled.fingerprint} | counts)
        dataset = mlflow_run.log_dataset(predictions[["study_id", "image_id", "path", "truth"]],
                                         labelled.data_dir, labelled.fingerprint,
                                         name=f"external-{labelled.data_dir.resolve().name}",
                                         context="evaluation")
        # How many scored films were far from the training films (kept in the numbers,
        # flagged in predictions.csv: the test split's own rate is test_ood_rate).
        if predictions.in_distribution[scored].notna().all():
            mlflow.log_metric("eval_ood_rate",
                              float((~predictions.in_distribution[scored].astype(bool))
                                    .mean()))
        model_id = registry.logged_model_id(version) if version else None
        mlflow_run.log_evaluation(evaluation, "eval", model_id=model_id, dataset=dataset)
        csv = predictions.to_csv(index=False)
        mlflow.log_text(csv, "predictions.csv")
        if config.output:
            atomic_write(Path(config.output), lambda file: file.write(csv.encode()))
    return run.info.run_id


def _print_summary(config: EvaluateConfig, version, class_names: tuple[str, ...],
                   labelled: LabelledSet, predictions: pd.DataFrame, evaluation: Evaluation,
                   run_id: str) -> None:
    described = f"{version.name} version {version.version}" if version else config.model_uri
    scored = int((predictions.error == "").sum())
    unreadable = len(predictions) - scored
    print(f"evaluated {described} on {scored} studies of {labelled.data_dir}"
          + (f" ({unreadable} unreadable, listed in predictions.csv)" if unreadable else "")
          + f": run {run_id}")
    keys = ["roc_auc", "accuracy", "balanced_accuracy", "map", "ece", "ece_uncalibrated",
            "brier"]
    keys += ["sensitivity", "specificity"] if len(class_names) == 2 else []
    for key in keys:
        print(f"  {evaluation.line(key)}")
