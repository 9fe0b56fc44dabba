"""SIIM layout -> labelled study table -> selection -> seeded train/val/test manifest.

The manifest (one row per study: ids, path, patient, group, label, split) is what training
reads and what each run logs as its dataset input, so a run can always be traced back to
exactly the files it saw. Splits cut between patients, never through one: a patient's
follow-up studies, and any film that appears twice, stay on one side of the line.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from covid_xray.config import BALANCES, TrainConfig
from covid_xray.errors import DicomError, UserError
from covid_xray.imaging.cache import ImageCache, load_entry, pixel_digest
from covid_xray.imaging.gate import check
from covid_xray.imaging.likeness import thumbnail
from covid_xray.pseudonyms import IMPLAUSIBLE_RULE, implausible_patients

STUDY_CSV = "train_study_level.csv"
IMAGE_CSV = "train_image_level.csv"
CLASS_COLUMNS = (
    "Negative for Pneumonia",
    "Typical Appearance",
    "Indeterminate Appearance",
    "Atypical Appearance",
)
CLASS_NAMES = {
    # The binary task is "any pneumonia-type opacity vs none": SIIM's typical, indeterminate
    # and atypical (for COVID-19) appearances together. It is not a COVID-19 test.
    2: ("negative", "opacity"),
    4: ("negative", "typical", "indeterminate", "atypical"),
}
SPLITS = ("train", "val", "test")
DEFAULTS = TrainConfig()
DOWNLOAD_HINT = "run `mlflow run . -e download` (or `-P source=synthetic` for demo data) first"


def read_study_labels(csv_path: str | os.PathLike) -> pd.DataFrame:
    """`train_study_level.csv` -> DataFrame(study_id, siim_class) with siim_class in 0..3.

    The header must be SIIM's and every row one-hot; the error names the first bad row.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise UserError(f"{csv_path}: label file not found; {DOWNLOAD_HINT}")
    # utf-8-sig: Excel saves CSVs with a byte-order mark, which would glue itself to "id".
    with open(csv_path, newline="", encoding="utf-8-sig") as file:
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
    unlabelled: list[str] = field(default_factory=list)  # folders under train/ not in the CSV


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
    unlabelled = sorted(set(files) - set(labels.study_id))
    return StudyTable(studies, sorted(multi_image), sorted(missing), unlabelled)


def assign_groups(studies: pd.DataFrame) -> pd.Series:
    """The unit a split may not cut, per study: its patient, joined with every patient holding
    the same film (equal `pixel_digest`, when that column is there). A study with no usable
    PatientID is a patient of its own. Each group is named after its first study id."""
    parent: dict[str, str] = {}

    def find(key: str) -> str:
        while parent.setdefault(key, key) != key:
            parent[key] = parent[parent[key]]  # path halving keeps the chains short
            key = parent[key]
        return key

    def join(first: str, second: str) -> None:
        parent[find(first)] = find(second)

    patients = [f"patient:{pid}" if pid else f"study:{sid}"
                for pid, sid in zip(studies.patient_id, studies.study_id, strict=True)]
    if "pixel_digest" in studies:
        for patient, digest in zip(patients, studies.pixel_digest, strict=True):
            join(patient, f"film:{digest}")
    roots = [find(patient) for patient in patients]
    first_study = pd.Series(studies.study_id.to_numpy()).groupby(roots).transform("min")
    return pd.Series(first_study.to_numpy(), index=studies.index, name="group_id")


def drop_repeated_films(studies: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Keep one study per film (the lowest study id) and return the ids of the copies dropped.

    Why drop rather than keep both in one split: a repeated film is one observation. Kept
    twice in test, it counts one film's outcome twice and narrows every confidence interval;
    kept twice in train, it silently doubles that film's weight. Its patients stay joined in
    one group (`assign_groups`), so the copy's other studies cannot land on the other side.
    """
    repeated = studies.sort_values("study_id").duplicated("pixel_digest", keep="first")
    dropped = sorted(studies.study_id[repeated.reindex(studies.index)])
    return studies[~repeated.reindex(studies.index)], dropped


def select_studies(
    studies: pd.DataFrame, num_classes: int, dataset_size: int, seed: int,
    balance: str = DEFAULTS.balance,
) -> pd.DataFrame:
    """Add `label`/`class_name` for the task and draw the studies it uses, whole groups at a
    time (a patient's studies are all in or all out).

    Binary: negative = 0, opacity (the other three) = 1; with balance=undersample as many
    opacity studies as negatives (drawn at random across the three classes), else all.
    4-class: SIIM's classes, all studies (undersampling to the rarest, atypical, would throw
    away most of the data; use balance=weights there).
    `dataset_size` > 0 then caps the count, keeping the label mix. Groups are visited in a
    seeded random order and taken while they fit every label's quota; with mostly one-study
    patients the quotas fill exactly, else to within a patient's studies.
    """
    if num_classes not in CLASS_NAMES:
        raise UserError(f"num_classes must be 2 or 4, got {num_classes}")
    # Sort first: the draw must not depend on the order the filesystem listed files in.
    studies = studies.sort_values("study_id", ignore_index=True)
    label = (studies.siim_class > 0).astype(int) if num_classes == 2 else studies.siim_class
    studies = studies.assign(label=label)
    if "group_id" not in studies:
        studies = studies.assign(group_id=studies.study_id)
    available = np.bincount(studies.label, minlength=num_classes)
    if balance not in BALANCES:
        raise UserError(f"balance must be {', '.join(BALANCES)}, got {balance!r}")
    undersample = num_classes == 2 and balance == "undersample"
    quota = np.full(2, available.min()) if undersample else available
    if 0 < dataset_size < quota.sum():
        quota = np.round(quota * dataset_size / quota.sum()).astype(int)

    groups = _label_counts_by_group(studies, num_classes)
    # A label whose quota is all there is (the negatives, when balancing) needs every group
    # holding it: visit those first, or a group holding it and a filled label gets refused.
    whole = groups.to_numpy()[:, quota >= available].any(axis=1)
    order = np.random.default_rng(seed).permutation(len(groups))
    order = order[np.argsort(~whole[order], kind="stable")]
    taken, kept = np.zeros(num_classes, dtype=int), []
    for index in order:
        if np.all(taken + groups.iloc[index].to_numpy() <= quota):
            taken += groups.iloc[index].to_numpy()
            kept.append(groups.index[index])
    studies = studies[studies.group_id.isin(kept)].reset_index(drop=True)
    names = CLASS_NAMES[num_classes]
    return studies.assign(class_name=[names[value] for value in studies.label])


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
    """Add a `split` column (train/val/test): whole groups, stratified by label, deterministic
    in seed. No group (patient, repeated film) is ever on two sides of the line.

    Greedy and exact for one-study groups: groups go largest first (ties in seeded random
    order), each to the split where it most reduces the squared shortfall against that split's
    share of every label. sklearn's StratifiedGroupKFold does this for k equal folds only.
    """
    fractions = np.array(parse_split(split))
    groups = _label_counts_by_group(studies, int(studies.label.max()) + 1)
    targets = fractions[:, None] * groups.sum(axis=0).to_numpy()[None, :]  # split x label
    filled = np.zeros_like(targets)
    rng = np.random.default_rng(seed)
    sizes = groups.sum(axis=1).to_numpy()
    order = sorted(rng.permutation(len(groups)), key=lambda index: -sizes[index])
    assignment = {}
    for index in order:
        counts = groups.iloc[index].to_numpy()
        gain = ((filled + counts - targets) ** 2 - (filled - targets) ** 2).sum(axis=1)
        gain[fractions == 0] = np.inf  # a 0% split gets nothing
        chosen = int(np.argmin(gain))
        filled[chosen] += counts
        assignment[groups.index[index]] = SPLITS[chosen]
    studies = studies.assign(split=studies.group_id.map(assignment))
    if not (studies.split == "train").any():
        raise UserError(f"split {split} leaves no training study out of {len(studies)}; "
                        "use more studies (dataset_size) or another split")
    return studies.sort_values(["split", "study_id"], ignore_index=True)


def _label_counts_by_group(studies: pd.DataFrame, num_classes: int) -> pd.DataFrame:
    """Rows: group ids (sorted); columns: how many of the group's studies have each label."""
    return (pd.crosstab(studies.group_id, studies.label)
            .reindex(columns=range(num_classes), fill_value=0).sort_index())


# file_digest (of the DICOM's bytes) and pixel_digest (of the decoded square) let a later
# evaluation find the model's own studies in another folder, renamed or re-exported.
MANIFEST_COLUMNS = ["study_id", "image_id", "path", "patient_id", "group_id", "siim_class",
                    "label", "class_name", "split", "file_digest", "pixel_digest"]


@dataclass
class Manifest:
    """The studies a run uses, their cache entries, and what was dropped to get there."""

    table: pd.DataFrame  # MANIFEST_COLUMNS
    entries: list[Path]  # each row's cached square, same order
    data_dir: Path
    num_classes: int
    multi_image: list[str]
    missing_files: list[str]
    repeated_films: list[str]  # studies dropped as copies of another study's film
    unreadable: list[str] = field(default_factory=list)  # dropped by skip_unreadable
    unlabelled: list[str] = field(default_factory=list)  # folders absent from the CSV
    patient_id_read_errors: int = 0  # headers that could not be read (retried next run)
    refused_by_gate: list[str] = field(default_factory=list)  # lateral views, other parts

    def thumbnails(self) -> np.ndarray:
        """Each row's standardised thumbnail (imaging/likeness.py), same order: what finds a
        re-encoded copy of one of these films later."""
        return np.stack([thumbnail(load_entry(entry)) for entry in self.entries])

    def counts(self) -> dict[str, int]:
        """Studies per split and class, e.g. {'train/negative': 120, ...}, patients, drops."""
        counts = {f"{split}/{name}": int(count) for (split, name), count in
                  self.table.groupby(["split", "class_name"]).size().items()}
        patients = self.table.patient_id.where(self.table.patient_id != "",
                                               "study:" + self.table.study_id)
        studies_per_patient = patients.value_counts()
        counts["patients"] = len(studies_per_patient)
        counts["patients_with_several_studies"] = int((studies_per_patient > 1).sum())
        # No PatientID, a placeholder, or one on implausibly many studies: each its own.
        counts["studies_without_patient_id"] = int((self.table.patient_id == "").sum())
        counts["repeated_films"] = len(self.repeated_films)
        counts["dropped_multi_image"] = len(self.multi_image)
        counts["dropped_missing_file"] = len(self.missing_files)
        counts["dropped_unreadable"] = len(self.unreadable)
        counts["dropped_by_gate"] = len(self.refused_by_gate)
        counts["unlabelled_folders"] = len(self.unlabelled)
        counts["patient_id_read_errors"] = self.patient_id_read_errors
        return counts

    def summary(self) -> str:
        """What the data step kept and what it left out, for the screen (the same counts are
        logged as the run's `count/...` params)."""
        counts = self.counts()
        left_out = {"with several images": counts["dropped_multi_image"],
                    "labelled without a file": counts["dropped_missing_file"],
                    "unreadable": counts["dropped_unreadable"],
                    "refused by the input gate (not frontal, not chest)":
                        counts["dropped_by_gate"],
                    "repeated films": counts["repeated_films"]}
        lines = [f"{len(self.table)} studies of {counts['patients']} patients "
                 f"({counts['patients_with_several_studies']} with several studies, "
                 f"{counts['studies_without_patient_id']} studies without a usable PatientID, "
                 "each its own); split by patient: "
                 + ", ".join(f"{name} {(self.table.split == name).sum()}" for name in SPLITS),
                 "studies left out: " + ", ".join(f"{count} {what}" for what, count in
                                                  left_out.items())]
        if self.unlabelled:
            lines.append(f"{len(self.unlabelled)} folder(s) under train/ are not in {STUDY_CSV}"
                         f" and were ignored (first: {self.unlabelled[0]})")
        if self.patient_id_read_errors:
            lines.append(f"warning: {self.patient_id_read_errors} header(s) could not be read "
                         "for their PatientID; those studies count as their own patients this "
                         "run, and are read again next run")
        return "\n".join(lines)

    def split(self, name: str) -> pd.DataFrame:
        return self.table[self.table.split == name].reset_index(drop=True)

    def split_entries(self, name: str) -> list[Path]:
        return [entry for entry, keep in zip(self.entries, self.table.split == name,
                                             strict=True) if keep]


def build_manifest(
    data_dir: str | os.PathLike,
    cache: ImageCache,
    *,
    num_classes: int = 2,
    balance: str = DEFAULTS.balance,
    dataset_size: int = 0,
    split: str = "60,20,20",
    seed: int = 0,
    num_workers: int = 0,
    skip_unreadable: bool = False,
    progress: bool = True,
) -> Manifest:
    """The whole data step: find studies -> patients (headers) -> select by patient -> decode
    into the cache -> join patients that share a film, keep one copy -> split by group."""
    data_dir = Path(data_dir)
    parse_split(split)  # a typo should cost nothing: check before reading any file
    found = find_studies(data_dir)
    if found.studies.empty:
        raise UserError(f"{data_dir}: no labelled study has exactly one DICOM; {DOWNLOAD_HINT}")
    studies = found.studies
    headers, read_errors = cache.headers([data_dir / path for path in studies.path], progress)
    # What the input gate would refuse to answer about (a lateral view, another body part),
    # the model does not learn from either: trained on, it would be scored on it.
    refused = [not passes_gate(fields) for fields in headers]
    gated = sorted(studies.study_id[refused])
    studies = studies[[not bad for bad in refused]].reset_index(drop=True)
    patients = [fields["patient"] for fields, bad in zip(headers, refused, strict=True)
                if not bad]
    studies = studies.assign(patient_id=without_placeholders(patients, progress))
    selected = select_studies(studies.assign(group_id=assign_groups(studies)), num_classes,
                              dataset_size, seed, balance)
    if selected.empty:
        counts = studies.siim_class.value_counts().sort_index()
        raise UserError(f"no study could be selected for the {num_classes}-class task from "
                        f"{len(studies)} studies (SIIM classes " + ", ".join(
                            f"{CLASS_NAMES[4][index]} {count}" for index, count in
                            counts.items()) + f", balance={balance}); a balanced binary task "
                        "needs negative and opacity studies: add studies of the missing class "
                        "or set balance=weights")

    selected, dropped_unreadable = _decoded(selected, data_dir, cache, num_workers,
                                            skip_unreadable, progress)
    selected = selected.assign(group_id=assign_groups(selected))
    selected, repeated = drop_repeated_films(selected)
    table = split_studies(selected, split, seed)
    manifest = Manifest(table[MANIFEST_COLUMNS], list(table.entry), data_dir, num_classes,
                        found.multi_image, found.missing_files, repeated, dropped_unreadable,
                        found.unlabelled, read_errors, gated)
    if progress:
        print(manifest.summary())
    return manifest


def _decoded(selected: pd.DataFrame, data_dir: Path, cache: ImageCache, num_workers: int,
             skip_unreadable: bool, progress: bool) -> tuple[pd.DataFrame, list[str]]:
    """The selected studies decoded into the cache, each with its cache entry and digests;
    the study ids dropped as unreadable (refused unless `skip_unreadable`)."""
    paths = [data_dir / path for path in selected.path]
    entries, stats = cache.build(paths, num_workers=num_workers, progress=progress)
    if progress:
        print(f"{len(entries)} images: {stats.decoded} decoded, {stats.reused} from "
              f"{cache.folder}")
    unreadable = [str(path) in stats.unreadable for path in paths]
    if any(unreadable) and not skip_unreadable:
        first = sorted(stats.unreadable.values())[0]
        raise UserError(f"{sum(unreadable)} of {len(paths)} DICOMs could not be read (the rest "
                        f"are cached; all are listed in {cache.unreadable_list}); first: "
                        f"{first}; fix or remove them, or set skip_unreadable=true to train "
                        "without those studies")
    entries = [entry for entry, bad in zip(entries, unreadable, strict=True) if not bad]
    kept = selected[[not bad for bad in unreadable]]
    return (kept.assign(entry=entries, file_digest=[entry.stem for entry in entries],
                        pixel_digest=[pixel_digest(entry) for entry in entries]),
            sorted(selected.study_id[unreadable]))


def passes_gate(fields: dict[str, str]) -> bool:
    """Whether the input gate would let a film with these header fields through."""
    try:
        check(fields.get("ViewPosition", ""), fields.get("BodyPartExamined", ""), "")
    except DicomError:
        return False
    return True


def without_placeholders(patients: list[str], say: bool = True) -> list[str]:
    """`patients` (one pseudonym per study) with those naming implausibly many studies
    blanked: such a PatientID is a placeholder (a site's code, say), and kept it would make
    one giant "patient", all in one split, whose every later study is refused as a
    follow-up. A blank study is a patient of its own, as one without a PatientID. Says so."""
    implausible = implausible_patients(patients)
    if say:
        for patient, count in implausible.items():
            print(f"one PatientID (pseudonym {patient}) is on {count} of {len(patients)} "
                  f"studies ({IMPLAUSIBLE_RULE}): a placeholder, not a patient; those studies "
                  "count as patients of their own")
    return ["" if patient in implausible else patient for patient in patients]
