"""What a model learned from: the manifest its training run logged, and which studies of
another set are among them.

A model scored on studies it was trained or validated on looks better than it is, and nothing
in the numbers shows it. Evaluation therefore reads the model's own manifest (every study of
its train / val / test splits, with the digests of each file's bytes and of its decoded
pixels) and matches the evaluated studies against it by study id, image id (SIIM names each
file by its SOPInstanceUID), file digest and pixel digest: a renamed copy, or the same film
exported again under new UIDs, is found too.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from covid_xray.pseudonyms import implausible_patients

MANIFEST_ARTIFACT = "data/manifest.csv"
THUMBNAILS_ARTIFACT = "data/thumbnails.npz"  # each manifest film's thumbnail (likeness.py)
KEY_FINGERPRINT_TAG = "pseudonym_key_fingerprint"  # which key named the manifest's patients
LEARNED_SPLITS = ("train", "val")  # the model's weights, epoch, temperature and threshold


def logged_manifest(run_id: str) -> pd.DataFrame | None:
    """The manifest a training run logged; None for a run that logged none (a model logged by
    other code)."""
    try:
        path = mlflow.artifacts.download_artifacts(run_id=run_id,
                                                   artifact_path=MANIFEST_ARTIFACT)
    except (MlflowException, OSError):
        return None
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def logged_data_dir(run_id: str) -> Path | None:
    """Where the training run's data is on this machine: its `data_dir` param (as typed to
    `mlflow run`, or as we log it: relative paths as given, absolute ones by their last part)
    read from the current folder when relative. None when the run logged none."""
    data_dir = MlflowClient().get_run(run_id).data.params.get("data_dir", "").strip("'\"")
    return Path(data_dir).absolute() if data_dir else None


def logged_thumbnails(run_id: str, study_ids: pd.Series) -> np.ndarray | None:
    """The thumbnails the training run logged for `study_ids` (its learned studies), or None
    for a run that logged none (a model trained before they were)."""
    try:
        path = mlflow.artifacts.download_artifacts(run_id=run_id,
                                                   artifact_path=THUMBNAILS_ARTIFACT)
    except (MlflowException, OSError):
        return None
    with np.load(path, allow_pickle=False) as arrays:
        by_study = dict(zip(arrays["study_id"], arrays["thumbnails"], strict=True))
        side = arrays["thumbnails"].shape[1:]
    found = [by_study[study] for study in study_ids if study in by_study]
    return np.stack(found).astype(np.float32) if found else np.empty((0, *side), np.float32)


def learned(manifest: pd.DataFrame) -> pd.DataFrame:
    """The manifest's studies the model learned from: its train and val splits."""
    return manifest[manifest.split.isin(LEARNED_SPLITS)]


def learned_from(studies: pd.DataFrame, manifest: pd.DataFrame,
                 pixel_digests: list[str] | None = None, patients: list[str] | None = None,
                 near_duplicates: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per reason, which studies of `studies` (study_id, image_id, file_digest) the model
    was trained or validated on: the same study or image id, file, decoded pixels
    (`pixel_digests`, same order; "" for a film that could not be decoded), patient
    (`patients`: keyed pseudonyms, under the key the manifest's were made with), or a
    near-duplicate film (`near_duplicates`, a mask computed by the caller)."""
    seen = learned(manifest)
    found = {"study or image id": (studies.study_id.isin(seen.study_id)
                                   | studies.image_id.isin(seen.image_id)).to_numpy()}
    if "file_digest" in seen:
        found["file"] = studies.file_digest.isin(seen.file_digest).to_numpy()
    if pixel_digests is not None and "pixel_digest" in seen:
        known = set(seen.pixel_digest) - {""}
        found["pixels"] = np.array([digest in known for digest in pixel_digests], dtype=bool)
    if patients is not None:
        # A PatientID on implausibly many of the manifest's studies (from a model trained
        # before such ids counted as none) is a placeholder: it names no one here either.
        known = set(seen.patient_id) - {""} - set(implausible_patients(manifest.patient_id))
        found["patient"] = np.array([patient in known for patient in patients], dtype=bool)
    if near_duplicates is not None:
        found["near-duplicate film"] = np.asarray(near_duplicates, dtype=bool)
    return found
