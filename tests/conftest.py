"""Shared fixtures: tiny SIIM-layout datasets and paths to the real reference files."""

from __future__ import annotations

from pathlib import Path

import pytest

from covid_xray import synthetic

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
REAL_DICOM = SHARED_DATA / "dicom" / "siim-acr-sample-cr-jpeg-baseline.dcm"
REAL_STUDY_CSV = SHARED_DATA / "siim" / "train_study_level.csv"


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 studies of 48 px films, 4 of them with two images; read-only by convention."""
    data_dir = tmp_path_factory.mktemp("siim") / "data"
    return synthetic.make_dataset(data_dir, num_studies=48, image_size=48,
                                  multi_image_studies=4, seed=7, progress=False)
