"""Synthetic data: the exact SIIM layout, every encoding, and a signal a model can learn."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pydicom
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from covid_xray.data.studies import build_manifest, read_study_labels
from covid_xray.data.synthetic import ENCODINGS, make_dataset
from covid_xray.imaging.cache import CacheParams, ImageCache
from covid_xray.imaging.dicom import read_xray
from covid_xray.imaging.preprocess import load_square, normalize

HEX12 = re.compile(r"[0-9a-f]{12}")


def test_layout_ids_csvs_and_encodings(tiny_dataset):
    files = sorted(tiny_dataset.glob("train/*/*/*.dcm"))
    assert len(files) == 48 + 4
    for path in files:
        study, series, image = path.parts[-3], path.parts[-2], path.stem
        assert all(HEX12.fullmatch(part) for part in (study, series, image))
    labels = read_study_labels(tiny_dataset / "train_study_level.csv")
    assert len(labels) == 48
    assert {path.parts[-3] for path in files} == set(labels.study_id)

    syntaxes = Counter()
    photometric = Counter()
    for path in files:
        ds = pydicom.dcmread(path)
        syntaxes[ds.file_meta.TransferSyntaxUID] += 1
        photometric[ds.PhotometricInterpretation] += 1
        image = read_xray(path)
        assert image.shape == (ds.Rows, ds.Columns) and 0 <= image.min() < image.max() <= 1
    assert set(syntaxes) == {encoding.syntax for encoding in ENCODINGS}
    assert set(photometric) == {"MONOCHROME1", "MONOCHROME2"}
    assert any(pydicom.dcmread(p).BitsStored == 12 for p in files)
    assert any(pydicom.dcmread(p).BitsStored == 16 for p in files)


def test_refuses_to_overwrite(tiny_dataset):
    with pytest.raises(FileExistsError):
        make_dataset(tiny_dataset, num_studies=2, image_size=16, progress=False)


def test_patients_come_back_and_films_repeat(tmp_path):
    data_dir = make_dataset(tmp_path / "d", num_studies=40, image_size=24, multi_image_studies=2,
                            follow_up_fraction=0.5, repeated_films=3, seed=1, progress=False)
    headers = {path.parts[-3]: pydicom.dcmread(path) for path in data_dir.glob("train/*/*/*.dcm")
               if len(list(path.parents[1].glob("*/*.dcm"))) == 1}
    patients = Counter(ds.PatientID for ds in headers.values())
    assert all(HEX12.fullmatch(pid) for pid in patients)
    assert max(patients.values()) <= 4 and sum(n > 1 for n in patients.values()) >= 3
    labels = read_study_labels(data_dir / "train_study_level.csv").set_index("study_id")
    by_pixels: dict[bytes, list[str]] = {}
    for study, ds in headers.items():
        by_pixels.setdefault(ds.PixelData, []).append(study)
    repeats = [studies for studies in by_pixels.values() if len(studies) > 1]
    assert len(repeats) == 3
    for first, second in repeats:  # same film, same label, but other ids, UIDs and patient
        assert labels.siim_class[first] == labels.siim_class[second]
        assert headers[first].SOPInstanceUID != headers[second].SOPInstanceUID
        assert headers[first].PatientID != headers[second].PatientID


def test_same_seed_same_data(tmp_path):
    one = make_dataset(tmp_path / "a", num_studies=6, image_size=24, seed=3, progress=False)
    two = make_dataset(tmp_path / "b", num_studies=6, image_size=24, seed=3, progress=False)
    assert (one / "train_study_level.csv").read_text() == (two / "train_study_level.csv").read_text()
    assert not list(tmp_path.glob("*/.synthetic-*"))  # the work folder is gone


def test_opacities_are_learnable(tmp_path):
    """A linear model on 32 px pixels must beat chance by far: the signal is in the images."""
    # 300 studies: with 160, the test split holds 24 studies and its AUC swings 0.85-1.0 by seed.
    data_dir = make_dataset(tmp_path / "d", num_studies=300, image_size=64, seed=5,
                            progress=False)
    manifest = build_manifest(data_dir, ImageCache(tmp_path / "cache", CacheParams(32)),
                              num_classes=2, split="70,0,30", seed=5, progress=False)

    def features(split):
        rows = manifest.split(split)
        pixels = [normalize(load_square(data_dir / p, 32)).ravel() for p in rows.path]
        return np.stack(pixels), rows.label.to_numpy()

    train_x, train_y = features("train")
    test_x, test_y = features("test")
    model = LogisticRegression(C=0.1, max_iter=2000).fit(train_x, train_y)
    assert roc_auc_score(test_y, model.predict_proba(test_x)[:, 1]) >= 0.9
