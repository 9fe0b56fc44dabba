"""Labels, study discovery, selection and split: exact counts, reproducible draws."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from covid_xray.data.studies import (
    CLASS_COLUMNS,
    MANIFEST_COLUMNS,
    STUDY_CSV,
    assign_groups,
    build_manifest,
    drop_repeated_films,
    find_studies,
    read_image_labels,
    read_study_labels,
    select_studies,
    split_studies,
)
from covid_xray.data.synthetic import make_dataset
from covid_xray.errors import UserError
from covid_xray.imaging.cache import CacheParams, ImageCache
from covid_xray.imaging.preprocess import load_square
from covid_xray.imaging.writer import write_dicom
from covid_xray.pseudonyms import pseudonym, pseudonym_key

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


@pytest.mark.parametrize("balance", ["weights", "none"])
def test_without_undersampling_every_study_is_kept(balance):
    labels = siim_sized_labels()
    binary = select_studies(labels, num_classes=2, dataset_size=0, seed=0, balance=balance)
    assert binary.label.value_counts().to_dict() == {1: 6054 - 1676, 0: 1676}
    assert set(binary.class_name) == {"negative", "opacity"}


def test_an_unknown_balance_is_refused():
    with pytest.raises(UserError, match="balance must be undersample, weights, none"):
        select_studies(siim_sized_labels(), 2, 0, 0, balance="oversample")


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


def patients_of(studies: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Give `studies` patients holding 1-4 studies each (labels independent, as follow-ups'
    are), and make every 50th study a repeated film of the study before it, under another
    patient: the shape of BIMCV + RICORD."""
    rng = np.random.default_rng(seed)
    sizes = rng.choice([1, 2, 3, 4], size=len(studies), p=[0.55, 0.25, 0.12, 0.08])
    patients = np.repeat(np.arange(len(studies)), sizes)[: len(studies)]
    digests = [f"film{i}" for i in range(len(studies))]
    for i in range(50, len(studies), 50):
        digests[i] = digests[i - 1]
    return studies.assign(patient_id=[f"p{value}" for value in rng.permutation(patients)],
                          pixel_digest=digests)


def crossing(table: pd.DataFrame, column: str) -> set:
    """Values of `column` found in more than one split."""
    splits_per_value = table.groupby(column).split.nunique()
    return set(splits_per_value[splits_per_value > 1].index)


@pytest.mark.parametrize(("num_classes", "seed"), [(2, 0), (2, 1), (4, 2)])
def test_no_patient_and_no_film_crosses_a_split(num_classes, seed):
    studies = patients_of(siim_sized_labels(seed), seed)
    studies = studies.assign(group_id=assign_groups(studies))
    assert studies.patient_id.value_counts().gt(1).sum() > 500  # many patients come back
    kept, dropped = drop_repeated_films(studies)
    assert len(dropped) == len(studies) // 50 - (len(studies) % 50 == 0)
    assert not kept.pixel_digest.duplicated().any()
    table = split_studies(select_studies(kept, num_classes, 0, seed), "60,20,20", seed)
    assert crossing(table, "patient_id") == set()
    assert crossing(table, "group_id") == set()
    # A dropped copy's patient is joined to the kept copy's: it cannot sit on the other side.
    for study_id in dropped:
        copy = studies.set_index("study_id").loc[study_id]
        original = studies[(studies.pixel_digest == copy.pixel_digest)
                           & (studies.study_id != study_id)].iloc[0]
        assert copy.group_id == original.group_id
        same_patient = table[table.patient_id.isin([copy.patient_id, original.patient_id])]
        assert same_patient.split.nunique() <= 1
    # Stratified: each split holds its share of every label, within one patient's worth.
    for split, share in (("train", 0.6), ("val", 0.2), ("test", 0.2)):
        for label, count in table.label.value_counts().items():
            in_split = ((table.split == split) & (table.label == label)).sum()
            assert abs(in_split - share * count) <= 4, (split, label, in_split, share * count)
    pd.testing.assert_frame_equal(
        table, split_studies(select_studies(kept, num_classes, 0, seed), "60,20,20", seed))


def test_selection_takes_whole_patients_and_stays_balanced():
    studies = patients_of(siim_sized_labels(5), 5)
    studies = studies.assign(group_id=assign_groups(studies))
    chosen = select_studies(studies, num_classes=2, dataset_size=640, seed=5)
    counts = chosen.label.value_counts()
    assert abs(counts[0] - 320) <= 1 and abs(counts[1] - 320) <= 1
    assert counts[0] == counts[1] or abs(counts[0] - counts[1]) <= 2
    for patient in chosen.patient_id.unique():  # all of a patient's studies, or none
        assert (chosen.patient_id == patient).sum() == (studies.patient_id == patient).sum()


def test_a_study_without_patient_id_is_its_own_group():
    studies = pd.DataFrame({"study_id": ["a", "b", "c", "d"], "patient_id": ["", "", "x", "x"]})
    assert assign_groups(studies).tolist() == ["a", "b", "c", "c"]
    key = b"k" * 32
    assert pseudonym("", key) == "" and pseudonym("x", key) == pseudonym("x", key) != "x"


def test_manifest_on_a_synthetic_tree_drops_multi_image_and_missing(tiny_dataset, tmp_path):
    data_dir = tmp_path / "data"
    shutil.copytree(tiny_dataset, data_dir)
    table = find_studies(data_dir)
    assert len(table.multi_image) == 4
    assert table.missing_files == []
    one_study = table.studies.study_id.iloc[0]
    shutil.rmtree(data_dir / "train" / one_study)

    cache = ImageCache(tmp_path / "cache", CacheParams(16))
    manifest = build_manifest(data_dir, cache, num_classes=4, split="50,25,25", seed=1,
                              progress=False)
    assert manifest.missing_files == [one_study]
    assert len(manifest.table) == 48 - 4 - 1
    assert manifest.counts()["dropped_multi_image"] == 4
    assert manifest.counts()["dropped_missing_file"] == 1
    assert list(manifest.table.columns) == MANIFEST_COLUMNS
    for path in manifest.table.path:
        assert (data_dir / path).is_file() and Path(path).parts[0] == "train"
    assert manifest.table.image_id.str.fullmatch(r"[0-9a-f]{12}").all()
    pd.testing.assert_frame_equal(manifest.table, build_manifest(
        data_dir, cache, num_classes=4, split="50,25,25", seed=1, progress=False).table)


def test_manifest_splits_by_patient_and_keeps_one_copy_of_each_film(tmp_path):
    """A tree where patients hold 1-4 studies and 6 films appear twice under other ids."""
    data_dir = make_dataset(tmp_path / "data", num_studies=90, image_size=24,
                            multi_image_studies=0, follow_up_fraction=0.5, repeated_films=6,
                            seed=4, progress=False)
    truth = {path.parts[-3]: pydicom.dcmread(path, stop_before_pixels=True).PatientID
             for path in data_dir.glob("train/*/*/*.dcm")}
    studies_per_patient = pd.Series(truth).value_counts()
    assert studies_per_patient.max() > 1

    manifest = build_manifest(data_dir, ImageCache(tmp_path / "cache", CacheParams(24)),
                              num_classes=4, split="60,20,20", seed=2, progress=False)
    table = manifest.table
    assert len(manifest.repeated_films) == 6 and len(table) == 90 - 6
    key = pseudonym_key(tmp_path / "cache")
    assert table.patient_id.tolist() == [pseudonym(truth[s], key) for s in table.study_id]
    assert crossing(table, "patient_id") == set() and crossing(table, "group_id") == set()
    kept = pd.Series(truth)[table.study_id]
    counts = manifest.counts()
    assert counts["patients"] == kept.nunique()
    assert counts["patients_with_several_studies"] == int((kept.value_counts() > 1).sum())
    assert counts["repeated_films"] == 6
    # Every dropped copy's film is still there once, in the group of the copy's patient.
    pixels = {s: load_square(data_dir / p, 24).tobytes() for s, p in
              zip(table.study_id, table.path, strict=True)}
    for study_id in manifest.repeated_films:
        path = next((data_dir / "train" / study_id).glob("*/*.dcm"))
        film = load_square(path, 24).tobytes()
        assert sum(value == film for value in pixels.values()) == 1


def test_unreadable_files_are_counted_listed_and_can_be_skipped(tiny_dataset, tmp_path):
    data_dir = tmp_path / "data"
    shutil.copytree(tiny_dataset, data_dir)
    studies = find_studies(data_dir).studies
    broken = [data_dir / path for path in studies.path[:2]]
    for path in broken:
        path.write_bytes(b"scanner crashed" * 10)
    cache = ImageCache(tmp_path / "cache", CacheParams(16))
    with pytest.raises(UserError) as caught:
        build_manifest(data_dir, cache, num_classes=4, progress=False)
    message = str(caught.value)
    assert message.startswith(f"2 of {len(studies)} DICOMs could not be read (the rest are "
                              f"cached; all are listed in {tmp_path / 'cache' / 'unreadable.txt'})")
    assert message.endswith("or set skip_unreadable=true to train without those studies")
    listed = (tmp_path / "cache" / "unreadable.txt").read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in listed) == sorted(map(str, broken))

    manifest = build_manifest(data_dir, cache, num_classes=4, skip_unreadable=True,
                              progress=False)
    assert len(manifest.table) == len(studies) - 2
    assert manifest.unreadable == sorted(studies.study_id[:2])
    assert manifest.counts()["dropped_unreadable"] == 2


def test_a_placeholder_patient_id_is_no_patient_in_splitting(tmp_path, capsys):
    """Every third study's PatientID is ANONYMOUS: that is no patient, exactly as a blank tag
    is. Before, it was one giant patient the balanced draw could not take: 15 studies selected,
    not 20 (on 400 synthetic studies 176 of 400; on 400 real ones 0, then a traceback)."""
    data_dir = make_dataset(tmp_path / "anonymous", num_studies=45, image_size=16,
                            multi_image_studies=0, seed=3, progress=False)
    blank = tmp_path / "blank"
    shutil.copytree(data_dir, blank)
    for index, path in enumerate(sorted((data_dir / "train").glob("*/*/*.dcm"))):
        if index % 3 == 0:
            for root, patient_id in ((data_dir, " anonymous "), (blank, "")):
                film = pydicom.dcmread(root / path.relative_to(data_dir))
                film.PatientID = patient_id
                film.save_as(root / path.relative_to(data_dir))
    manifests = [build_manifest(root, ImageCache(tmp_path / "cache", CacheParams(16)),
                                progress=False).table for root in (data_dir, blank)]
    columns = ["study_id", "patient_id", "group_id", "split"]
    pd.testing.assert_frame_equal(manifests[0][columns], manifests[1][columns])
    assert len(manifests[0]) == 20 and (manifests[0].patient_id == "").sum() == 8


def test_a_patient_id_on_implausibly_many_studies_is_no_patient(tmp_path, capsys):
    """A code no list knows (a site's) on every study: it was refused ('one PatientID ... is
    a placeholder'), and on a third of them it made one giant patient. Now no patient, said
    in one line naming the count and the rule; a balanced draw that can take nothing is one
    line too."""
    data_dir = tmp_path / "data"
    rows = []
    for index in range(6):
        study = f"{index:012x}"
        path = data_dir / "train" / study / "aaaaaaaaaaaa" / f"{index + 100:012x}.dcm"
        path.parent.mkdir(parents=True)
        write_dicom(path, np.random.default_rng(index).integers(0, 4000, (8, 8)),
                    patient_id="SITE-7")
        rows.append(f"{study}_study,{int(index % 2 == 0)},{int(index % 2 == 1)},0,0\n")
    (data_dir / STUDY_CSV).write_text(HEADER + "".join(rows))
    manifest = build_manifest(data_dir, ImageCache(tmp_path / "cache", CacheParams(8)))
    key = pseudonym_key(tmp_path / "cache")
    assert (f"one PatientID (pseudonym {pseudonym('SITE-7', key)}) is on 6 of 6 studies (more "
            "than 50 studies, or more than 20% of the set and more than 5): a placeholder, not "
            "a patient; those studies count as patients of their own") in capsys.readouterr().out
    assert manifest.table.patient_id.tolist() == [""] * 6
    assert manifest.counts()["studies_without_patient_id"] == 6

    (data_dir / STUDY_CSV).write_text(HEADER + "".join(
        f"{index:012x}_study,1,0,0,0\n" for index in range(6)))
    with pytest.raises(UserError, match=r"^no study could be selected for the 2-class task "
                       r"from 6 studies \(SIIM classes negative 6, balance=undersample\)"):
        build_manifest(data_dir, ImageCache(tmp_path / "cache", CacheParams(8)), progress=False)


def test_image_level_csv_is_read_when_present(tiny_dataset):
    images = read_image_labels(tiny_dataset / "train_image_level.csv")
    assert len(images) == 48 + 4
    assert images.image_id.str.fullmatch(r"[0-9a-f]{12}").all()
    assert read_image_labels(tiny_dataset / "absent.csv") is None


def test_a_byte_order_mark_is_accepted(tmp_path):
    """Excel writes UTF-8 CSVs with a BOM; it must not make 'id' unrecognisable."""
    (tmp_path / STUDY_CSV).write_bytes(("\ufeff" + HEADER + "aaa_study,0,1,0,0\n").encode())
    assert read_study_labels(tmp_path / STUDY_CSV).to_dict("list") == {
        "study_id": ["aaa"], "siim_class": [1]}


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
    cache = ImageCache(tmp_path / "cache", CacheParams(8))
    with pytest.raises(UserError, match=r"no train/ folder.*-e download"):
        build_manifest(tmp_path, cache)
    (tmp_path / "train").mkdir()
    with pytest.raises(UserError, match=r"label file not found.*-e download"):
        build_manifest(tmp_path, cache)
    (tmp_path / STUDY_CSV).write_text(HEADER + "aaa_study,1,0,0,0\n")
    with pytest.raises(UserError, match="no labelled study has exactly one DICOM"):
        build_manifest(tmp_path, cache)


@pytest.mark.parametrize("split", ["60,20", "a,b,c", "-1,50,51", "0,50,50"])
def test_bad_split_strings(tiny_dataset, tmp_path, split):
    with pytest.raises(UserError, match="split must be three non-negative numbers"):
        build_manifest(tiny_dataset, ImageCache(tmp_path, CacheParams(8)), split=split)
    assert not list(tmp_path.iterdir())  # refused before reading a file


def test_too_few_studies_to_train_on(tiny_dataset, tmp_path):
    with pytest.raises(UserError, match="leaves no training study out of 2"):
        build_manifest(tiny_dataset, ImageCache(tmp_path, CacheParams(8)), num_classes=2,
                       dataset_size=2, split="10,45,45", progress=False)


def test_pseudonyms_are_keyed_and_the_key_stays_on_this_machine(tmp_path, monkeypatch, capsys):
    """HMAC-SHA256 under a secret key: an unkeyed hash of an enumerable record number is
    reversed by hashing every possible number. The key is made once, mode 0600, in the user's
    config folder (or taken from COVID_XRAY_PSEUDONYM_KEY), and equal ids still get equal
    names."""
    import hashlib
    import hmac
    import stat

    monkeypatch.delenv("COVID_XRAY_PSEUDONYM_KEY", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    key = pseudonym_key(tmp_path / "cache")
    key_file = tmp_path / "config" / "covid-xray" / "pseudonym.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert len(key) == 64 and key_file.read_text() == key.decode() + "\n"
    assert f"created the pseudonym key {key_file}" in capsys.readouterr().out
    assert not (tmp_path / "cache").exists()  # a cache is disposable: the key is not in it
    assert pseudonym_key(tmp_path / "cache") == key  # made once, then reused
    assert capsys.readouterr().out == ""
    expected = hmac.new(key, b"MRN-004217", hashlib.sha256).hexdigest()[:16]
    assert pseudonym("MRN-004217", key) == expected
    # Without the key, hashing every candidate number finds nothing.
    unkeyed = {hashlib.blake2b(f"MRN-{n:06d}".encode(), digest_size=6).hexdigest()
               for n in range(5000)}
    assert expected not in unkeyed and pseudonym("MRN-004217", b"other key") != expected
    shared = "shared-secret-of-at-least-32-characters"
    monkeypatch.setenv("COVID_XRAY_PSEUDONYM_KEY", shared)
    assert pseudonym_key(tmp_path / "elsewhere") == shared.encode()
    assert not (tmp_path / "elsewhere").exists()
    # A short key is guessable, and with it every pseudonym: refused in one line.
    monkeypatch.setenv("COVID_XRAY_PSEUDONYM_KEY", "shared-secret")
    with pytest.raises(UserError, match=r"^COVID_XRAY_PSEUDONYM_KEY has 13 characters; a "
                                        r"pseudonym key needs at least 32 \(make one with"):
        pseudonym_key(tmp_path / "elsewhere")


def test_a_users_key_outlives_every_cache_and_an_old_cache_key_is_adopted_once(
        tmp_path, monkeypatch, capsys):
    """The key lived in the cache folder: another cache_dir, or a deleted cache, silently made
    a new key, and every model trained under the old one lost its patient check. Now the key
    is the user's; a key an earlier version left in a cache becomes it, once, with a line."""
    monkeypatch.delenv("COVID_XRAY_PSEUDONYM_KEY", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    old_cache, other_cache = tmp_path / "old-cache", tmp_path / "other-cache"
    old_cache.mkdir()
    other_cache.mkdir()
    (old_cache / "pseudonym.key").write_text("a" * 64 + "\n")  # as the earlier version wrote
    (other_cache / "pseudonym.key").write_text("b" * 64 + "\n")
    key_file = tmp_path / "config" / "covid-xray" / "pseudonym.key"

    assert pseudonym_key(old_cache) == b"a" * 64  # the user's pseudonyms stay theirs
    assert capsys.readouterr().out == (f"adopted the pseudonym key of {old_cache / 'pseudonym.key'}"
                                       f" as {key_file}: every cache and run of this user now "
                                       "uses it (the cache's copy is no longer read)\n")
    assert pseudonym_key(other_cache) == b"a" * 64  # adopted once: one key per user
    shutil.rmtree(old_cache)
    assert pseudonym_key(tmp_path / "new-cache") == b"a" * 64
    assert capsys.readouterr().out == "" and not (tmp_path / "new-cache").exists()

    key_file.write_text("")
    with pytest.raises(UserError, match=rf"^{key_file}: the pseudonym key file is empty; "
                                        "restore it from a backup"):
        pseudonym_key(old_cache)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "not-a-folder"))
    (tmp_path / "not-a-folder").write_text("a file")
    with pytest.raises(UserError, match=r"^cannot make the pseudonym key .*not-a-folder/"
                                        r"covid-xray/pseudonym.key \(Not a directory\); set "
                                        "XDG_CONFIG_HOME to a folder this user can write"):
        pseudonym_key(old_cache)


def test_the_data_step_says_what_it_left_out(tiny_dataset, tmp_path, capsys, monkeypatch):
    """Studies dropped (several images, no file), folders the CSV does not name and headers
    that could not be read are printed, not only logged as params."""
    import errno

    import covid_xray.imaging.dicom as dicom_module

    data_dir = tmp_path / "data"
    shutil.copytree(tiny_dataset, data_dir)
    table = find_studies(data_dir)
    gone, unreadable = table.studies.study_id.iloc[0], table.studies.path.iloc[1]
    shutil.rmtree(data_dir / "train" / gone)
    stray = data_dir / "train" / "abcdefabcdef" / "abcdefabcdef" / "abcdefabcdef.dcm"
    stray.parent.mkdir(parents=True)
    shutil.copy(data_dir / table.studies.path.iloc[2], stray)
    real_read = dicom_module.pydicom.dcmread

    def flaky(path, *args, **kwargs):
        if kwargs.get("stop_before_pixels") and str(path).endswith(unreadable):
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(dicom_module.pydicom, "dcmread", flaky)
    manifest = build_manifest(data_dir, ImageCache(tmp_path / "cache", CacheParams(16)),
                              num_classes=4, split="50,25,25", seed=1)
    lines = capsys.readouterr().out.splitlines()
    assert "studies left out: 4 with several images, 1 labelled without a file, 0 unreadable, " \
           "0 refused by the input gate (not frontal, not chest), 0 repeated films" in lines
    assert ("1 folder(s) under train/ are not in train_study_level.csv and were ignored "
            "(first: abcdefabcdef)") in lines
    assert ("warning: 1 header(s) could not be read for their PatientID; those studies count "
            "as their own patients this run, and are read again next run") in lines
    counts = manifest.counts()
    assert counts["unlabelled_folders"] == 1 and counts["patient_id_read_errors"] == 1


def test_a_malformed_header_is_skipped_like_any_unreadable_file(tiny_dataset, tmp_path):
    """A text WindowCenter raised ValueError in the cache builder, which caught only
    DicomError: training stopped even with skip_unreadable=true. It is now that file's
    reason in the unreadable list, and the study is dropped like any unreadable one."""
    from tests.test_dicom import with_header

    data_dir = tmp_path / "data"
    shutil.copytree(tiny_dataset, data_dir)
    victim = find_studies(data_dir).studies.iloc[0]
    path = data_dir / victim.path
    with_header(path, path, WindowCenter="abc", WindowWidth="400")
    cache = ImageCache(tmp_path / "cache", CacheParams(16))
    with pytest.raises(UserError, match=r"1 of \d+ DICOMs could not be read .*malformed DICOM "
                                        r"header \(ValueError"):
        build_manifest(data_dir, cache, num_classes=4, progress=False)
    manifest = build_manifest(data_dir, cache, num_classes=4, skip_unreadable=True,
                              progress=False)
    assert manifest.unreadable == [victim.study_id]
    assert manifest.counts()["dropped_unreadable"] == 1
    assert victim.study_id not in set(manifest.table.study_id)


def test_films_the_input_gate_refuses_are_not_trained_on(tiny_dataset, tmp_path):
    """A lateral view and a film of another body part would be refused when the model is
    asked about them; the data step leaves them out too (counted), so evaluation of the
    model's own test split sees exactly what training tested."""
    import pydicom

    data_dir = tmp_path / "data"
    shutil.copytree(tiny_dataset, data_dir)
    studies = find_studies(data_dir).studies
    for path, field, value in ((studies.path.iloc[0], "ViewPosition", "LL"),
                               (studies.path.iloc[1], "BodyPartExamined", "ABDOMEN"),
                               (studies.path.iloc[2], "BodyPartExamined", "PORT CHEST")):
        dataset = pydicom.dcmread(data_dir / path)
        setattr(dataset, field, value)
        dataset.save_as(data_dir / path)
    manifest = build_manifest(data_dir, ImageCache(tmp_path / "cache", CacheParams(16)),
                              num_classes=4, split="50,25,25", seed=1, progress=False)
    assert manifest.refused_by_gate == sorted(studies.study_id.iloc[:2])
    assert manifest.counts()["dropped_by_gate"] == 2
    assert studies.study_id.iloc[2] in set(manifest.table.study_id)  # the chest, in words


def test_the_cache_holds_no_patient_id_and_a_bad_key_stops_before_any_read(
        tiny_dataset, tmp_path, monkeypatch):
    """Teams share a cache folder: its header memo held every raw PatientID beside the key
    that pseudonymises them. Now it holds pseudonyms only, and a key too short to keep them
    secret is refused before a single header is read (it used to be checked after the memo
    was filled)."""
    from covid_xray.imaging.dicom import read_patient_id

    raw = {read_patient_id(path) for path in tiny_dataset.rglob("*.dcm")} - {""}
    assert len(raw) > 10
    monkeypatch.setenv("COVID_XRAY_PSEUDONYM_KEY", "too-short")
    with pytest.raises(UserError, match="COVID_XRAY_PSEUDONYM_KEY has 9 characters"):
        build_manifest(tiny_dataset, ImageCache(tmp_path / "shared", CacheParams(16)),
                       progress=False)
    assert not list((tmp_path / "shared").glob("headers*"))  # nothing read, nothing kept

    monkeypatch.delenv("COVID_XRAY_PSEUDONYM_KEY")
    cache = ImageCache(tmp_path / "cache", CacheParams(16))
    manifest = build_manifest(tiny_dataset, cache, progress=False)
    key = pseudonym_key(tmp_path / "cache")
    assert set(manifest.table.patient_id) - {""} <= {pseudonym(pid, key) for pid in raw}
    kept = [path for path in (tmp_path / "cache").rglob("*") if path.is_file()
            and path.name != "pseudonym.key"]
    assert any("headers" in path.parts[-2] for path in kept)
    for path in kept:
        content = path.read_bytes()
        assert not [pid for pid in raw if pid.encode() in content], path
