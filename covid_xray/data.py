"""SIIM layout -> labelled study table -> selection -> seeded train/val/test manifest.

The manifest (one row per study: study_id, image_id, path, label, class_name, split) is what
training reads and what each run logs as its dataset input, so a run can always be traced back
to exactly the files it saw.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from covid_xray.errors import UserError

STUDY_CSV = "train_study_level.csv"
IMAGE_CSV = "train_image_level.csv"
CLASS_COLUMNS = (
    "Negative for Pneumonia",
    "Typical Appearance",
    "Indeterminate Appearance",
    "Atypical Appearance",
)
CLASS_NAMES = {
    2: ("negative", "positive"),
    4: ("negative", "typical", "indeterminate", "atypical"),
}
SPLITS = ("train", "val", "test")
DOWNLOAD_HINT = "run `mlflow run . -e download` (or `-P source=synthetic` for demo data) first"


def read_study_labels(csv_path: str | os.PathLike) -> pd.DataFrame:
    """`train_study_level.csv` -> DataFrame(study_id, siim_class) with siim_class in 0..3.

    The header must be SIIM's and every row one-hot; the error names the first bad row.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise UserError(f"{csv_path}: label file not found; {DOWNLOAD_HINT}")
    with open(csv_path, newline="") as file:
        rows = list(csv.reader(file))
    expected = ["id", *CLASS_COLUMNS]
    if not rows or [name.strip() for name in rows[0]] != expected:
        found = ",".join(rows[0]) if rows else "an empty file"
        raise UserError(f"{csv_path}: header must be {','.join(expected)}, found {found}")

    study_ids, classes = [], []
    for line_number, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != 5 or not row[0].endswith("_study") or any(v not in "01" or not v
                                                                 for v in row[1:]):
            raise UserError(f"{csv_path}: line {line_number} is not '<id>_study,0/1 x4': {row}")
        onehot = [int(v) for v in row[1:]]
        if sum(onehot) != 1:
            raise UserError(
                f"{csv_path}: line {line_number} ({row[0]}) must have exactly one 1, has "
                f"{sum(onehot)}"
            )
        study_ids.append(row[0].removesuffix("_study"))
        classes.append(onehot.index(1))
    table = pd.DataFrame({"study_id": study_ids, "siim_class": classes})
    if table.study_id.duplicated().any():
        duplicate = table.study_id[table.study_id.duplicated()].iloc[0]
        raise UserError(f"{csv_path}: study {duplicate} appears more than once")
    return table


def read_image_labels(csv_path: str | os.PathLike) -> pd.DataFrame | None:
    """`train_image_level.csv` (boxes per image) when present, else None."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        return None
    table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    missing = {"id", "StudyInstanceUID"} - set(table.columns)
    if missing:
        raise UserError(f"{csv_path}: missing column(s) {', '.join(sorted(missing))}")
    return table.assign(image_id=table.id.str.removesuffix("_image"))


@dataclass
class StudyTable:
    """Studies with exactly one image, and the ids of those dropped on the way."""

    studies: pd.DataFrame  # study_id, siim_class, image_id, path (relative to data_dir)
    multi_image: list[str] = field(default_factory=list)
    missing_files: list[str] = field(default_factory=list)


def find_studies(data_dir: str | os.PathLike) -> StudyTable:
    """Label every study that has exactly one DICOM under `train/<study>/*/*.dcm`.

    Studies with several images (usually a lateral view beside the frontal one) are dropped, as
    the label belongs to the study and we cannot tell which image shows it; so are labelled
    studies with no file.
    """
    data_dir = Path(data_dir)
    if not (data_dir / "train").is_dir():
        raise UserError(f"{data_dir}: no train/ folder of DICOMs; {DOWNLOAD_HINT}")
    labels = read_study_labels(data_dir / STUDY_CSV)

    files: dict[str, list[Path]] = {}
    for path in (data_dir / "train").glob("*/*/*.dcm"):
        files.setdefault(path.parts[-3], []).append(path)

    rows, multi_image, missing = [], [], []
    for study_id, siim_class in zip(labels.study_id, labels.siim_class, strict=True):
        study_files = files.get(study_id, [])
        if not study_files:
            missing.append(study_id)
        elif len(study_files) > 1:
            multi_image.append(study_id)
        else:
            path = study_files[0]
            rows.append((study_id, siim_class, path.stem, path.relative_to(data_dir).as_posix()))
    studies = pd.DataFrame(rows, columns=["study_id", "siim_class", "image_id", "path"])
    return StudyTable(studies, sorted(multi_image), sorted(missing))


def select_studies(
    studies: pd.DataFrame, num_classes: int, dataset_size: int, seed: int
) -> pd.DataFrame:
    """Add `label`/`class_name` for the task and draw the studies it uses.

    Binary: negative = 0, the other three = 1, balanced by drawing as many non-negatives as
    there are negatives (at random across the three classes). 4-class: SIIM's classes, all
    studies. `dataset_size` > 0 then caps the count, stratified by label.
    """
    if num_classes not in CLASS_NAMES:
        raise UserError(f"num_classes must be 2 or 4, got {num_classes}")
    rng = np.random.default_rng(seed)
    # Sort first: the draw must not depend on the order the filesystem listed files in.
    studies = studies.sort_values("study_id", ignore_index=True)
    if num_classes == 2:
        studies = studies.assign(label=(studies.siim_class > 0).astype(int))
        negatives = studies[studies.label == 0]
        positives = studies[studies.label == 1]
        count = min(len(negatives), len(positives))
        studies = pd.concat([
            negatives.iloc[np.sort(rng.choice(len(negatives), count, replace=False))],
            positives.iloc[np.sort(rng.choice(len(positives), count, replace=False))],
        ])
    else:
        studies = studies.assign(label=studies.siim_class)

    if 0 < dataset_size < len(studies):
        keep = dataset_size / len(studies)
        studies = studies.loc[_stratified_parts(studies, (keep, 1 - keep), rng)[0]]
    studies = studies.sort_values("study_id", ignore_index=True)
    names = CLASS_NAMES[num_classes]
    return studies.assign(class_name=[names[label] for label in studies.label])


def parse_split(split: str) -> tuple[float, float, float]:
    """'60,20,20' -> (0.6, 0.2, 0.2)."""
    try:
        parts = [float(part) for part in split.split(",")]
    except ValueError:
        parts = []
    if len(parts) != 3 or min(parts) < 0 or parts[0] <= 0 or sum(parts) <= 0:
        raise UserError(f"split must be three non-negative numbers 'train,val,test', got {split!r}")
    total = sum(parts)
    return (parts[0] / total, parts[1] / total, parts[2] / total)


def split_studies(studies: pd.DataFrame, split: str, seed: int) -> pd.DataFrame:
    """Add a `split` column (train/val/test), stratified by label and deterministic in seed."""
    parts = _stratified_parts(studies, parse_split(split), np.random.default_rng(seed))
    if not parts[0]:
        raise UserError(f"split {split} leaves no training study out of {len(studies)}; "
                        "use more studies (dataset_size) or another split")
    frames = [studies.loc[part].assign(split=name) for part, name in zip(parts, SPLITS,
                                                                         strict=True)]
    return pd.concat(frames).sort_values(["split", "study_id"], ignore_index=True)


def _stratified_parts(
    studies: pd.DataFrame, fractions: tuple[float, ...], rng: np.random.Generator
) -> list[list]:
    """Cut each label's studies, shuffled, into consecutive parts of the given fractions, so
    every part keeps the label mix. Unlike sklearn's splitter it never refuses a rare class."""
    parts: list[list] = [[] for _ in fractions]
    for _, group in studies.groupby("label", sort=True):
        order = rng.permutation(group.index.to_numpy())
        bounds = np.round(np.cumsum(fractions)[:-1] * len(order)).astype(int)
        for part, chunk in zip(parts, np.split(order, bounds), strict=True):
            part.extend(chunk.tolist())
    return parts


@dataclass
class Manifest:
    """The studies a run uses, with what was dropped to get there."""

    table: pd.DataFrame  # study_id, image_id, path, siim_class, label, class_name, split
    data_dir: Path
    num_classes: int
    multi_image: list[str]
    missing_files: list[str]

    def counts(self) -> dict[str, int]:
        """Studies per split and class, e.g. {'train/negative': 120, ...}, plus drops."""
        counts = {f"{split}/{name}": int(count) for (split, name), count in
                  self.table.groupby(["split", "class_name"]).size().items()}
        counts["dropped_multi_image"] = len(self.multi_image)
        counts["dropped_missing_file"] = len(self.missing_files)
        return counts

    def split(self, name: str) -> pd.DataFrame:
        return self.table[self.table.split == name].reset_index(drop=True)


def build_manifest(
    data_dir: str | os.PathLike,
    *,
    num_classes: int = 2,
    dataset_size: int = 0,
    split: str = "60,20,20",
    seed: int = 0,
) -> Manifest:
    """The whole data step: find studies, select for the task, split."""
    table = find_studies(data_dir)
    if table.studies.empty:
        raise UserError(f"{data_dir}: no labelled study has exactly one DICOM; {DOWNLOAD_HINT}")
    selected = select_studies(table.studies, num_classes, dataset_size, seed)
    columns = ["study_id", "image_id", "path", "siim_class", "label", "class_name", "split"]
    manifest = split_studies(selected, split, seed)[columns]
    return Manifest(manifest, Path(data_dir), num_classes, table.multi_image, table.missing_files)
