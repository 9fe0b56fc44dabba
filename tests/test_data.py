"""Labels, study discovery, selection and split: exact counts, reproducible draws."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from covid_xray.data import (
    CLASS_COLUMNS,
    STUDY_CSV,
    build_manifest,
    find_studies,
    read_image_labels,
    read_study_labels,
    select_studies,
    split_studies,
)
from covid_xray.errors import UserError

HEADER = "id," + ",".join(CLASS_COLUMNS) + "\n"
SIIM_CLASS_COUNTS = [1676, 2855, 1049, 474]  # the real file's, per SIIM class


def siim_sized_labels(seed: int = 0) -> pd.DataFrame:
    """A study table the size and class mix of the real SIIM training set, for full-scale
    selection and split tests that cannot carry the real (licensed) file."""
    rng = np.random.default_rng(seed)
    classes = rng.permutation(np.repeat(np.arange(4), SIIM_CLASS_COUNTS))
    ids = [f"{value:012x}" for value in rng.choice(16**12, len(classes), replace=False)]
    return pd.DataFrame({"study_id": ids, "siim_class": classes, "image_id": "x", "path": "x"})


def test_real_label_file_parses_to_siim_counts(real_study_csv):
    labels = read_study_labels(real_study_csv)
    assert len(labels) == 6054
    assert labels.siim_class.value_counts().sort_index().tolist() == SIIM_CLASS_COUNTS
    assert labels.study_id.str.fullmatch(r"[0-9a-f]{12}").all()


def test_siim_sized_labels_balance_to_twice_the_negatives():
    labels = siim_sized_labels()
    binary = select_studies(labels, num_classes=2, dataset_size=0, seed=0)
    assert binary.label.value_counts().to_dict() == {0: 1676, 1: 1676}
    # The positives are drawn from all three non-negative classes.
    assert set(binary[binary.label == 1].siim_class) == {1, 2, 3}
    four = select_studies(labels, num_classes=4, dataset_size=0, seed=0)
    assert four.label.value_counts().sort_index().tolist() == SIIM_CLASS_COUNTS
    assert four.class_name.iloc[0] in ("negative", "typical", "indeterminate", "atypical")


def test_split_sizes_are_exact_stratified_and_seeded():
    labels = siim_sized_labels()
    studies = select_studies(labels, num_classes=2, dataset_size=1000, seed=3)
    assert studies.label.value_counts().to_dict() == {0: 500, 1: 500}
    split = split_studies(studies, "60,20,20", seed=3)
    assert split.split.value_counts().to_dict() == {"train": 600, "val": 200, "test": 200}
    for name in ("train", "val", "test"):
        part = split[split.split == name]
        assert part.label.sum() == len(part) // 2  # balanced in every split
    again = split_studies(select_studies(labels, 2, 1000, seed=3), "60,20,20", seed=3)
    pd.testing.assert_frame_equal(split, again)
    other = split_studies(select_studies(labels, 2, 1000, seed=4), "60,20,20", seed=4)
    assert set(other.study_id) != set(split.study_id)
    assert not set(split[split.split == "train"].study_id) & set(split[split.split == "test"].study_id)


def test_manifest_on_a_synthetic_tree_drops_multi_image_and_missing(tiny_dataset, tmp_path):
    data_dir = tmp_path / "data"
    shutil.copytree(tiny_dataset, data_dir)
    table = find_studies(data_dir)
    assert len(table.multi_image) == 4
    assert table.missing_files == []
    one_study = table.studies.study_id.iloc[0]
    shutil.rmtree(data_dir / "train" / one_study)

    manifest = build_manifest(data_dir, num_classes=4, split="50,25,25", seed=1)
    assert manifest.missing_files == [one_study]
    assert len(manifest.table) == 48 - 4 - 1
    assert manifest.counts()["dropped_multi_image"] == 4
    assert manifest.counts()["dropped_missing_file"] == 1
    assert set(manifest.table.columns) == {"study_id", "image_id", "path", "siim_class",
                                           "label", "class_name", "split"}
    for path in manifest.table.path:
        assert (data_dir / path).is_file() and Path(path).parts[0] == "train"
    assert manifest.table.image_id.str.fullmatch(r"[0-9a-f]{12}").all()
    pd.testing.assert_frame_equal(
        manifest.table, build_manifest(data_dir, num_classes=4, split="50,25,25", seed=1).table)


def test_image_level_csv_is_read_when_present(tiny_dataset):
    images = read_image_labels(tiny_dataset / "train_image_level.csv")
    assert len(images) == 48 + 4
    assert images.image_id.str.fullmatch(r"[0-9a-f]{12}").all()
    assert read_image_labels(tiny_dataset / "absent.csv") is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "header must be id,Negative"),
        ("id,a,b,c,d\nx_study,1,0,0,0\n", "header must be"),
        (HEADER + "aaa_study,1,0,0,0\nbbb_study,0,1,1,0\n", r"line 3 \(bbb_study\) must have exactly one 1, has 2"),
        (HEADER + "aaa_study,0,0,0,0\n", r"line 2 \(aaa_study\) must have exactly one 1, has 0"),
        (HEADER + "aaa_study,1,0,0\n", "line 2 is not"),
        (HEADER + "aaa_study,yes,0,0,0\n", "line 2 is not"),
        (HEADER + "aaa_study,1,0,0,0\naaa_study,0,1,0,0\n", "study aaa appears more than once"),
    ],
    ids=["empty", "header", "two-ones", "no-one", "short-row", "not-binary", "duplicate"],
)
def test_bad_label_files_say_what_is_wrong(tmp_path, content, message):
    (tmp_path / STUDY_CSV).write_text(content)
    with pytest.raises(UserError, match=message):
        read_study_labels(tmp_path / STUDY_CSV)


def test_missing_data_points_to_download(tmp_path):
    with pytest.raises(UserError, match=r"no train/ folder.*-e download"):
        build_manifest(tmp_path)
    (tmp_path / "train").mkdir()
    with pytest.raises(UserError, match=r"label file not found.*-e download"):
        build_manifest(tmp_path)
    (tmp_path / STUDY_CSV).write_text(HEADER + "aaa_study,1,0,0,0\n")
    with pytest.raises(UserError, match="no labelled study has exactly one DICOM"):
        build_manifest(tmp_path)


@pytest.mark.parametrize("split", ["60,20", "a,b,c", "-1,50,51", "0,50,50"])
def test_bad_split_strings(tiny_dataset, split):
    with pytest.raises(UserError, match="split must be three non-negative numbers"):
        build_manifest(tiny_dataset, split=split)


def test_too_few_studies_to_train_on(tiny_dataset):
    with pytest.raises(UserError, match="leaves no training study out of 2"):
        build_manifest(tiny_dataset, num_classes=2, dataset_size=2, split="10,45,45")
