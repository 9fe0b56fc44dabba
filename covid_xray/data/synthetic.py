"""Synthetic datasets in the exact SIIM layout, for the demo and the tests.

Kaggle is out of reach on many machines (CI included), so this writes what the download entry
point would leave: `train/<study>/<series>/<image>.dcm` with 12-hex-digit ids, plus
`train_study_level.csv` and `train_image_level.csv`. The DICOMs mix the encodings real archives
hold (12/16-bit, MONOCHROME1/2, rescale + window, RLE, JPEG Baseline/Extended/Lossless, JPEG-LS,
JPEG 2000) and non-negative studies carry bright, class-specific opacities a model can learn.
"""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from tqdm import tqdm

from covid_xray.data.studies import CLASS_COLUMNS, IMAGE_CSV, STUDY_CSV
from covid_xray.imaging.writer import write_dicom

# SIIM's class mix (1676 / 2855 / 1049 / 474 studies): negative, typical, indeterminate, atypical.
SIIM_CLASS_FREQUENCIES = np.array([1676, 2855, 1049, 474]) / 6054


@dataclass(frozen=True)
class Encoding:
    """How one synthetic file is stored."""

    syntax: UID
    bits_stored: int = 12
    monochrome1: bool = False
    rescale: bool = False  # RescaleIntercept -1024 plus a window in modality units


# The mix the synthetic datasets cycle through: every transfer syntax the reader must handle.
ENCODINGS = (
    Encoding(ExplicitVRLittleEndian),
    Encoding(ExplicitVRLittleEndian, bits_stored=16, monochrome1=True),
    Encoding(ExplicitVRLittleEndian, rescale=True),
    Encoding(RLELossless),
    Encoding(JPEG2000Lossless),
    Encoding(JPEGLSLossless),
    Encoding(JPEGLosslessSV1, monochrome1=True),
    Encoding(JPEGBaseline8Bit, bits_stored=8),
    Encoding(JPEGExtended12Bit),
)


def chest_image(
    rng: np.random.Generator, label: int, rows: int, cols: int
) -> tuple[np.ndarray, list[dict[str, float]]]:
    """A float image in [0, 1] that looks roughly like a frontal chest film, and its opacity boxes.

    Label 0 (negative) has clear lungs. Non-negative classes get bright opacities in distinct
    places, so both the binary and the 4-class task are learnable:
    1 typical = bilateral lower-zone, 2 indeterminate = one large unilateral, 3 atypical = many
    small upper-zone nodules.
    """
    y, x = np.mgrid[-1 : 1 : rows * 1j, -1 : 1 : cols * 1j]
    body = np.exp(-(((x / 0.85) ** 2 + (y / 0.98) ** 2) ** 4))
    image = 0.15 + 0.55 * body
    lung_centres = [(-0.4, -0.05), (0.4, -0.05)]
    for cx, cy in lung_centres:
        lung = np.exp(-((((x - cx) / 0.26) ** 2 + ((y - cy) / 0.6) ** 2) ** 3))
        image -= 0.35 * lung * (1 + 0.08 * np.sin(18 * y + rng.uniform(0, 6)))  # faint ribs
    image += 0.25 * np.exp(-((x / 0.12) ** 2 + ((y - 0.1) / 0.7) ** 2))  # spine / mediastinum

    blobs: list[tuple[float, float, float]] = []  # (cx, cy, radius) in [-1, 1] units
    if label == 1:
        blobs = [(side * rng.uniform(0.3, 0.5), rng.uniform(0.15, 0.4), rng.uniform(0.12, 0.17))
                 for side in (-1, 1)]
    elif label == 2:
        side = rng.choice([-1, 1])
        blobs = [(side * rng.uniform(0.3, 0.45), rng.uniform(-0.2, 0.2), rng.uniform(0.2, 0.26))]
    elif label == 3:
        blobs = [(rng.choice([-1, 1]) * rng.uniform(0.25, 0.55), rng.uniform(-0.55, -0.25),
                  rng.uniform(0.05, 0.08)) for _ in range(5)]
    boxes = []
    for cx, cy, radius in blobs:
        image += 0.4 * np.exp(-(((x - cx) ** 2 + (y - cy) ** 2) / radius**2))
        boxes.append({
            "x": (cx - radius + 1) / 2 * cols, "y": (cy - radius + 1) / 2 * rows,
            "width": radius * cols, "height": radius * rows,
        })
    image += rng.normal(0, 0.02, image.shape)
    return np.clip(image, 0, 1), boxes


def make_dataset(
    data_dir: str | os.PathLike,
    *,
    num_studies: int = 400,
    image_size: int = 256,
    multi_image_studies: int = 6,
    follow_up_fraction: float = 0.3,
    repeated_films: int = 0,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Write a SIIM-layout dataset of `num_studies` studies into `data_dir` and return it.

    Built in a temporary sibling folder and renamed into place, so an interrupted run leaves
    nothing half-written. `multi_image_studies` of the studies get a second (lateral) image.
    Like BIMCV and RICORD, patients come back: about `follow_up_fraction` of the studies are
    another study of an earlier patient (1-4 studies each, same PatientID). The last
    `repeated_films` studies hold an earlier study's film again, pixel for pixel, under new
    ids, new UIDs and a new PatientID: the same picture exported twice, as public sets carry.
    """
    data_dir = Path(data_dir)
    if (data_dir / STUDY_CSV).exists() or (data_dir / "train").exists():
        raise FileExistsError(f"{data_dir} already holds a dataset")
    if not 0 <= repeated_films < num_studies:
        raise ValueError(f"repeated_films must be in [0, {num_studies}), got {repeated_films}")
    data_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    # Patients draw from their own stream, so the films stay those of the same seed without.
    patient_rng = np.random.default_rng([seed, 1])
    work = Path(tempfile.mkdtemp(prefix=".synthetic-", dir=data_dir))
    try:
        labels = rng.choice(4, size=num_studies, p=SIIM_CLASS_FREQUENCIES)
        study_rows, image_rows = [], []
        used_ids: set[str] = set()
        multi = set(rng.choice(num_studies, size=min(multi_image_studies, num_studies),
                               replace=False).tolist())
        originals = num_studies - repeated_films
        copied = patient_rng.choice(sorted(set(range(originals)) - multi),
                                    size=repeated_films, replace=False).tolist()
        films: dict[int, tuple[np.ndarray, Encoding, int]] = {}  # kept for the copies only
        patients: list[str] = []
        studies_of: Counter[str] = Counter()
        for index in tqdm(range(num_studies), desc="synthetic studies", disable=not progress):
            label = int(labels[index])
            study_id = _new_id(rng, used_ids)
            study_uid = generate_uid()
            returning = [p for p in patients if studies_of[p] < 4]
            if index < originals and returning and patient_rng.random() < follow_up_fraction:
                patient = returning[patient_rng.integers(len(returning))]
            else:
                patient = _new_id(patient_rng, used_ids)
                patients.append(patient)
            studies_of[patient] += 1
            if index >= originals:
                image, encoding, label = films[copied[index - originals]]
            study_rows.append([f"{study_id}_study", *(int(label == c) for c in range(4))])
            for view in range(2 if index in multi else 1):
                image_id, series_id = _new_id(rng, used_ids), _new_id(rng, used_ids)
                boxes: list[dict[str, float]] = []
                if index < originals:
                    # Real films are rarely square; vary the aspect so the centre crop matters.
                    rows = image_size
                    cols = int(image_size * rng.uniform(0.8, 1.2))
                    image, boxes = chest_image(rng, label, rows, cols)
                    if view == 1:
                        # stands in for the lateral view data/studies.py drops
                        image = image[:, ::-1]
                    encoding = ENCODINGS[(index + view) % len(ENCODINGS)]
                    if index in copied:
                        films[index] = (image, encoding, label)
                path = work / "train" / study_id / series_id / f"{image_id}.dcm"
                path.parent.mkdir(parents=True, exist_ok=True)
                _write_encoded(path, image, encoding, study_uid, patient,
                               _demographics(patient, study_id))
                label_text = " ".join(
                    f"opacity 1 {b['x']:.1f} {b['y']:.1f} {b['x'] + b['width']:.1f} "
                    f"{b['y'] + b['height']:.1f}" for b in boxes) or "none 1 0 0 1 1"
                image_rows.append([f"{image_id}_image", repr(boxes) if boxes else "",
                                   label_text, study_id])
        _write_csv(work / STUDY_CSV, ["id", *CLASS_COLUMNS], study_rows)
        _write_csv(work / IMAGE_CSV, ["id", "boxes", "label", "StudyInstanceUID"], image_rows)
        for name in ("train", STUDY_CSV, IMAGE_CSV):
            os.replace(work / name, data_dir / name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return data_dir


MANUFACTURERS = ("Acme Radiography", "Fuji", "GE Healthcare", "Philips")


def _demographics(patient: str, study_id: str) -> dict[str, str]:
    """Header fields for the subgroup tables, from the ids alone (the image stream stays as it
    was): a patient keeps one sex and age; view and device vary by study. Ages span every band
    (and one study in 16 has none); one study in 6 has no ViewPosition (the input gate flags
    it view_unknown and lets it through), like many real exports."""
    patient_bits, study_bits = int(patient, 16), int(study_id, 16)
    age = 5 + patient_bits % 90
    view = ("PA", "AP", "AP", "PA", "AP", "")[study_bits % 6]
    return {"PatientSex": "FM"[patient_bits % 2] if patient_bits % 11 else "O",
            "PatientAge": f"{age:03d}Y" if study_bits % 16 else "",
            "ViewPosition": view,
            "Manufacturer": MANUFACTURERS[(study_bits // 6) % len(MANUFACTURERS)]}


def _write_encoded(path: Path, image: np.ndarray, encoding: Encoding, study_uid: str,
                   patient_id: str = "", header: dict[str, str] | None = None) -> None:
    """Quantise `image` to the encoding's bits and write it the way that encoding says."""
    max_value = 2**encoding.bits_stored - 1
    stored = np.round(image * max_value)
    if encoding.monochrome1:
        stored = max_value - stored
    kwargs: dict = {}
    if encoding.rescale:
        # Modality units = stored - 1024; the window spans the whole image in those units.
        kwargs = {"rescale": (1.0, -1024.0), "window": (max_value / 2 - 1024, max_value + 1)}
    write_dicom(path, stored, syntax=encoding.syntax, bits_stored=encoding.bits_stored,
                photometric="MONOCHROME1" if encoding.monochrome1 else "MONOCHROME2",
                study_uid=study_uid, patient_id=patient_id, header=header, **kwargs)


def _new_id(rng: np.random.Generator, used: set[str]) -> str:
    """A fresh 12-hex-digit id, like SIIM's."""
    while True:
        candidate = rng.bytes(6).hex()
        if candidate not in used:
            used.add(candidate)
            return candidate


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)

