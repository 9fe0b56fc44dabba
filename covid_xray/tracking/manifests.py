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

MANIFEST_ARTIFACT = "data/manifest.csv"
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


def learned_from(studies: pd.DataFrame, manifest: pd.DataFrame,
                 pixel_digests: list[str] | None = None) -> np.ndarray:
    """Per study of `studies` (study_id, image_id, file_digest): True when it is one the model
    was trained or validated on, by any of the four keys. `pixel_digests` (same order; "" for
    a file that could not be decoded) adds the pixel match when the manifest has them."""
    learned = manifest[manifest.split.isin(LEARNED_SPLITS)]
    found = studies.study_id.isin(learned.study_id) | studies.image_id.isin(learned.image_id)
    if "file_digest" in learned:
        found |= studies.file_digest.isin(learned.file_digest)
    if pixel_digests is not None and "pixel_digest" in learned:
        known = set(learned.pixel_digest) - {""}
        found |= np.array([digest in known for digest in pixel_digests])
    return found.to_numpy()
