"""Results in DICOM: a Structured Report per study and a Grad-CAM Secondary Capture per film,
valid by dciodvfy (dicom3tools), read back by highdicom, filed against the source study."""

from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
from pathlib import Path

import cv2
import highdicom as hd
import mlflow
import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.valuerep import PersonName

from covid_xray.config import PredictConfig
from covid_xray.errors import UserError
from covid_xray.imaging.dicom import read_xray
from covid_xray.imaging.writer import write_dicom
from covid_xray.model.dicom_results import (
    SCOPES,
    FilmCounts,
    ModelIdentity,
    ReportedModel,
    StudyResults,
    as_uid,
    heatmap_capture,
    pixel_digest,
    read_source,
    study_report,
    to_bytes,
)
from covid_xray.model.requests import encode_dicom
from covid_xray.serving.predict import predict_files
from covid_xray.tracking.registry import load
from tests.conftest import REAL_DICOM

IDENTITY = ModelIdentity("covid-xray-densenet", "7", "0123456789abcdef0123456789abcdef")
CLASSES = ("negative", "opacity")
MODEL = ReportedModel(CLASSES, 0.4142135623730951, (0.625, 0.375), IDENTITY)


def dciodvfy_errors(dataset_or_path) -> list[str]:
    """dciodvfy's Error lines for an object (written to a file first) or a file."""
    validator = shutil.which("dciodvfy")
    if validator is None:
        message = "dciodvfy not installed (apt-get install dicom3tools)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs it: missing there is a real failure
        pytest.skip(message)
    path = dataset_or_path
    if not isinstance(path, str | Path):
        path = Path(os.environ.get("TMPDIR", "/tmp")) / f"check-{os.getpid()}.dcm"
        path.write_bytes(to_bytes(dataset_or_path))
    # (it echoes values in their own bytes: names need not be UTF-8)
    checked = subprocess.run([validator, str(path)], capture_output=True, text=True,
                             errors="replace")
    lines = (checked.stdout + checked.stderr).splitlines()
    assert any(line.strip() in ("Comprehensive3DSR", "SCImage") for line in lines), lines
    return [line for line in lines if line.startswith("Error")]


def siim_film(path: Path, photometric: str = "MONOCHROME2") -> Path:
    """A film the way SIIM ships them: 12 hex digits where the UIDs belong, and header
    values a result must not copy (an Age without its unit, an unknown sex)."""
    write_dicom(path, (np.arange(48 * 40).reshape(48, 40) * 2 % 4096), photometric=photometric,
                study_uid="00086460a852", series_uid="ffc1b5ad3e20", patient_id="d8ba599611e5",
                header={"PatientAge": "62", "PatientSex": "X", "ViewPosition": "AP"})
    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "65761e66de9f"
    ds.save_as(path)
    return path


def test_ids_that_are_not_uids_are_referenced_by_a_stable_derived_uid():
    assert as_uid("1.2.840.10008.5.1.4.1.1.1") == "1.2.840.10008.5.1.4.1.1.1"
    derived = as_uid("00086460a852")
    assert derived.startswith("2.25.") and derived[5:].isdigit() and len(derived) <= 64
    assert as_uid("00086460a852") == derived != as_uid("00086460a853")
    assert as_uid("1.02.3") != "1.02.3"  # a leading zero makes it no UID


def hostile_film(path: Path) -> Path:
    """Every copied header field malformed for its VR."""
    write_dicom(path, np.arange(32 * 32).reshape(32, 32) % 4096, header={
        "PatientName": "x" * 100, "PatientBirthDate": "yesterday", "StudyDate": "2020-13-45",
        "StudyTime": "ab", "AccessionNumber": "A" * 40, "StudyID": "S" * 30,
        "PatientOrientation": "Q\\Z", "ReferringPhysicianName": "=" * 80})
    return path


# A name in the source's declared character set, and one in 8-bit bytes with none declared
# (read as Latin-1, ISO_IR 100: see read_source).
NAMES = {"utf-8 declared": ({"SpecificCharacterSet": "ISO_IR 192", "PatientName":
                             PersonName("Müller^Zoë=王^小明")}, "Müller^Zoë=王^小明"),
         "8-bit undeclared": ({"PatientName": "Müller^Zoë".encode("latin-1")}, "Müller^Zoë")}


@pytest.mark.parametrize("kind", NAMES)
def test_a_non_ascii_name_reaches_the_results_intact_in_utf_8(kind, tmp_path):
    """Results copied the decoded name without a character set: `?^??` for the ideographic
    part, and dciodvfy's "character invalid for repertoire". Every result now says
    ISO_IR 192 (UTF-8: it holds any source's repertoire) and carries the name as read."""
    from tests.test_dicom import with_header

    fields, name = NAMES[kind]
    path = tmp_path / "film.dcm"
    with_header(siim_film(tmp_path / "plain.dcm"), path, **fields)
    sent = "Müller^Zoë=王^小明".encode() if kind == "utf-8 declared" else fields["PatientName"]
    assert sent in path.read_bytes()
    source = read_source(str(path))
    report = study_report([source], np.array([[0.25, 0.75]]), ["opacity"], MODEL)
    heatmap = heatmap_capture(source, np.zeros((48, 40, 3), np.uint8), "opacity",
                              pydicom.uid.generate_uid(), 1, IDENTITY)
    for result in (report, heatmap):
        written = to_file(result, tmp_path / "result.dcm")
        assert dciodvfy_errors(written) == []
        read_back = pydicom.dcmread(written)
        assert read_back.SpecificCharacterSet == "ISO_IR 192"
        assert str(read_back.PatientName) == name


@pytest.mark.parametrize("source_kind", ["real", "siim", "monochrome1", "hostile"])
def test_report_and_heatmap_are_valid_dicom_filed_against_the_source(source_kind, tmp_path):
    path = {"real": lambda: REAL_DICOM,
            "siim": lambda: siim_film(tmp_path / "siim.dcm"),
            "monochrome1": lambda: siim_film(tmp_path / "m1.dcm", "MONOCHROME1"),
            "hostile": lambda: hostile_film(tmp_path / "hostile.dcm")}[source_kind]()
    original = pydicom.dcmread(path, stop_before_pixels=True)
    source = read_source(str(path))
    films = np.array([[0.25, 0.75], [0.6180339887498949, 0.3819660112501051]])
    report = study_report([source, source], films, ["opacity", "negative"], MODEL,
                          FilmCounts(out_of_distribution=2, refused={"view": 1,
                                                                     "unreadable": 3}))
    heatmap = heatmap_capture(source, np.full((50, 40, 3), (0, 128, 255), np.uint8),
                              "opacity", pydicom.uid.generate_uid(), 1, IDENTITY)
    assert dciodvfy_errors(report) == []
    assert dciodvfy_errors(heatmap) == []

    # Filed in the source's study; referencing the film; the ids a UID cannot be are derived.
    study_uid = as_uid(original.StudyInstanceUID)
    film_uid = as_uid(original.SOPInstanceUID)
    if source_kind in ("real", "hostile"):
        assert (study_uid, film_uid) == (original.StudyInstanceUID, original.SOPInstanceUID)
    else:
        assert study_uid == as_uid("00086460a852") and film_uid == as_uid("65761e66de9f")
    read_back = hd.sr.srread(to_file(report, tmp_path / "sr.dcm"))
    assert read_back.StudyInstanceUID == study_uid == heatmap.StudyInstanceUID
    assert read_back.PatientID == original.PatientID == heatmap.PatientID
    assert read_back.SeriesInstanceUID not in (heatmap.SeriesInstanceUID,
                                               as_uid(original.SeriesInstanceUID))
    assert "PatientAge" not in read_back or read_back.PatientAge != "62"  # invalid: not copied
    evidence = read_back.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == study_uid
    assert evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]\
        .ReferencedSOPInstanceUID == film_uid

    groups = read_back.content.get_image_measurement_groups()
    assert [group.tracking_identifier for group in groups] == ["film 1", "film 2", "study"]
    for group, expected in zip(groups, [*films, films.mean(axis=0)], strict=True):
        values = {item.name.meaning: item.value for item in group.get_measurements()}
        assert values["Probability of negative"] == expected[0]  # exact: FloatingPointValue
        assert values["Probability of opacity"] == expected[1]
        assert {image.referenced_sop_instance_uid for image in group.source_images} == {
            film_uid}
    assert [group.get_qualitative_evaluations()[0].value.value for group in groups] == [
        "opacity", "negative", "opacity"]
    study = {item.name.meaning: item.value for item in groups[2].get_measurements()}
    assert study["Decision threshold on P(opacity)"] == 0.4142135623730951
    # What the answer rests on: the prevalence it is calibrated to, and every film counted.
    assert (study["Training prevalence of negative"],
            study["Training prevalence of opacity"]) == (0.625, 0.375)
    assert {name: value for name, value in study.items() if name.startswith("Films")} == {
        "Films scored (in the study's mean)": 2, "Films out of distribution (not in the mean)": 2,
        "Films refused (not in the mean)": 4, "Films refused: unreadable": 3,
        "Films refused: view": 1}
    assert groups[2].get_qualitative_evaluations()[1].value.meaning == SCOPES["folder"]

    # Who answered (IHE AI Results: Contributing Equipment), and what it is not for.
    for made in (read_back, heatmap):
        equipment = made.ContributingEquipmentSequence[0]
        assert equipment.ManufacturerModelName == "covid-xray-densenet"
        assert list(equipment.SoftwareVersions) == ["version 7", f"run {IDENTITY.run_id}"]
        assert equipment.DeviceSerialNumber == IDENTITY.run_id
        assert "not for diagnostic use" in equipment.ContributionDescription
        assert "not for diagnostic use" in made.SeriesDescription
    assert heatmap.SourceImageSequence[0].ReferencedSOPInstanceUID == film_uid
    assert heatmap.pixel_array.shape == (50, 40, 3)  # a small film's: its own size
    # BGR in, RGB out of the file (JPEG: within a few levels)
    assert np.abs(heatmap.pixel_array[0, 0].astype(int) - (255, 128, 0)).max() <= 4
    assert "Grad-CAM of class opacity" in heatmap.ImageComments  # whose evidence it shows


def test_the_heatmap_of_a_3000_by_2500_film_is_a_jpeg_under_a_megabyte(tmp_path):
    """A heatmap was the film's raw RGB at full size: 22.5 MB for a 3000 x 2500 film, more
    than the film. Now at most 1024 px on its long side, JPEG baseline, and valid."""
    film = cv2.resize(read_xray(REAL_DICOM), (3000, 2500), interpolation=cv2.INTER_LINEAR)
    picture = cv2.cvtColor(np.round(film * 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)
    heat = cv2.applyColorMap(np.tile(np.linspace(0, 255, 2500, dtype=np.uint8), (2500, 1)),
                             cv2.COLORMAP_JET)
    picture[:, 250:2750] = cv2.addWeighted(picture[:, 250:2750], 0.6, heat, 0.4, 0)
    heatmap = heatmap_capture(read_source(str(REAL_DICOM)), picture, "opacity",
                              pydicom.uid.generate_uid(), 1, IDENTITY)
    data = to_bytes(heatmap)
    assert len(data) <= 1_000_000, len(data)
    assert (heatmap.Columns, heatmap.Rows) == (1024, 853)
    assert heatmap.file_meta.TransferSyntaxUID == pydicom.uid.JPEGBaseline8Bit
    assert (heatmap.LossyImageCompression, heatmap.LossyImageCompressionMethod) == (
        "01", "ISO_10918_1") and float(heatmap.LossyImageCompressionRatio) > 10
    assert "(3000 x 2500 pixels), shown at 1024 x 853" in heatmap.DerivationDescription
    read_back = pydicom.dcmread(io.BytesIO(data))
    expected = cv2.resize(picture, (1024, 853), interpolation=cv2.INTER_AREA)[..., ::-1]
    assert np.abs(read_back.pixel_array.astype(int) - expected).mean() < 3
    assert dciodvfy_errors(heatmap) == []


def to_file(dataset, path: Path) -> Path:
    path.write_bytes(to_bytes(dataset))
    return path


def test_a_missing_study_uid_is_a_study_of_its_own_and_the_report_covers_only_given_films(
        tmp_path):
    a, b = tmp_path / "a.dcm", tmp_path / "b.dcm"
    for path in (a, b):
        write_dicom(path, np.arange(32 * 32).reshape(32, 32) % 4096)
        ds = pydicom.dcmread(path)
        del ds.StudyInstanceUID
        ds.save_as(path)
    results = StudyResults(MODEL, "folder")
    for path in (a, b):
        results.add(read_source(str(path)), np.array([0.3, 0.7]), "opacity")
    reports, failed = results.reports()
    assert len(reports) == 2 and not failed  # no shared study to put them in
    for report in reports.values():
        assert dciodvfy_errors(report) == []


def predict_with_dicom_out(folder: Path, tmp_path: Path, batch_size: int
                           ) -> tuple[pd.DataFrame, Path]:
    """predict on `folder` with the trained store's model, DICOM results into tmp_path/pacs;
    the CSVs are tmp_path/p.csv and p.studies.csv."""
    out = tmp_path / "pacs"
    table = predict_files(PredictConfig(
        model_uri="models:/covid-xray-densenet/Production", input=str(folder),
        output=str(tmp_path / "p.csv"), batch_size=batch_size, num_workers=0,
        dicom_out=str(out)), progress=False)
    return table, out


def test_predict_writes_reports_and_heatmaps_that_match_the_csv(store, demo_dataset, tmp_path):
    folder = tmp_path / "in"
    studies = sorted((demo_dataset / "train").iterdir())[:4]
    for study in studies:
        shutil.copytree(study, folder / study.name)
    shutil.copy(REAL_DICOM, folder / "real.dcm")  # far from this model's synthetic films
    (folder / "broken.dcm").write_bytes(b"garbage" * 50)
    table, out = predict_with_dicom_out(folder, tmp_path, batch_size=3)
    studies_csv = pd.read_csv(tmp_path / "p.studies.csv", keep_default_na=False, dtype=str)

    scored = table[table.label != ""]
    assert len(scored) >= 4 and not scored.path.str.endswith(("real.dcm", "broken.dcm")).any()
    reports = sorted(out.glob("*/sr-*.dcm"))
    heatmaps = sorted(out.glob("*/sc-*.dcm"))
    assert len(heatmaps) == len(scored)  # one per scored film, none for a refused one
    assert {path.parent.name for path in reports} == set(scored.study_instance_uid)
    assert len(reports) == scored.study_instance_uid.nunique()
    run_id = mlflow.MlflowClient().get_model_version("covid-xray-densenet", "1").run_id

    # As the CSV says it (read back from the file), exactly.
    written = pd.read_csv(tmp_path / "p.csv", keep_default_na=False, dtype=str)
    by_film = written[written.label != ""].set_index("sop_instance_uid")
    for path in reports:
        assert dciodvfy_errors(path) == []
        report = hd.sr.srread(path)
        assert report.StudyInstanceUID == path.parent.name
        equipment = report.ContributingEquipmentSequence[0]
        assert list(equipment.SoftwareVersions) == ["version 1", f"run {run_id}"]
        groups = report.content.get_image_measurement_groups()
        for group in groups[:-1]:  # each film: the CSV's probabilities and label, exactly
            (image,) = group.source_images
            row = by_film.loc[image.referenced_sop_instance_uid]
            values = {item.name.meaning: item.value for item in group.get_measurements()}
            assert values["Probability of opacity"] == float(row.prob_opacity)
            assert values["Probability of negative"] == float(row.prob_negative)
            assert group.get_qualitative_evaluations()[0].value.value == row.label
        study = studies_csv.set_index("study_instance_uid").loc[path.parent.name]
        values = {item.name.meaning: item.value for item in groups[-1].get_measurements()}
        assert values["Probability of opacity"] == pytest.approx(float(study.prob_opacity),
                                                                 abs=1e-12)
        assert groups[-1].get_qualitative_evaluations()[0].value.value == study.label
        assert len(groups) - 1 == int(study.scored)
    for path in heatmaps[:3]:
        assert dciodvfy_errors(path) == []
        image = pydicom.dcmread(path)
        source = table.set_index("sop_instance_uid").loc[
            image.SourceImageSequence[0].ReferencedSOPInstanceUID]
        assert image.StudyInstanceUID == source.study_instance_uid == path.parent.name
        film = pydicom.dcmread(source.path)
        assert (image.Rows, image.Columns) == (film.Rows, film.Columns)  # the film's own size

    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                filter_string="params.dicom_out = 'True'")
    assert run.data.params["count/dicom_reports"] == str(len(reports))
    assert run.data.params["count/dicom_heatmaps"] == str(len(heatmaps))
    assert str(out) not in str(run.data.params)  # no paths of this machine logged


@pytest.mark.slow
def test_an_unwritable_dicom_out_fails_before_scoring(store, demo_dataset, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    runs = len(mlflow.search_runs(search_all_experiments=True, output_format="list"))
    with pytest.raises(UserError, match=r"^dicom_out .*a-file/pacs: cannot write there"):
        predict_files(PredictConfig(model_uri="models:/covid-xray-densenet/Production",
                                    input=str(demo_dataset / "train"),
                                    output=str(tmp_path / "p.csv"),
                                    dicom_out=str(blocker / "pacs")), progress=False)
    assert not (tmp_path / "p.csv").exists()
    assert len(mlflow.search_runs(search_all_experiments=True, output_format="list")) == runs


@pytest.mark.slow
def test_the_loaded_model_returns_the_objects_as_base64(store, demo_dataset):
    films = sorted((demo_dataset / "train").rglob("*.dcm"))[:3]
    frame = pd.DataFrame({"dicom_base64": [encode_dicom(str(path)) for path in films]
                          + [encode_dicom(str(REAL_DICOM))]})
    model = load("models:/covid-xray-densenet/Production")
    plain = model.predict(None, frame)
    answer = model.predict(None, frame, params={"dicom_results": True})
    pd.testing.assert_frame_equal(answer[plain.columns], plain)
    assert answer.heatmap_base64.iloc[-1] == answer.sr_base64.iloc[-1] == ""  # refused: none
    for row in answer[answer.label != ""].itertuples():
        report = hd.sr.Comprehensive3DSR.from_dataset(
            pydicom.dcmread(pydicom.filebase.DicomBytesIO(base64.b64decode(row.sr_base64))))
        sources = {image.referenced_sop_instance_uid: group for group in
                   report.content.get_image_measurement_groups()[:-1]
                   for image in group.source_images}
        values = {item.name.meaning: item.value
                  for item in sources[row.sop_instance_uid].get_measurements()}
        assert values["Probability of opacity"] == row.prob_opacity
        # A request may hold part of a study: its report says it covers that request only.
        scope = report.content.get_image_measurement_groups()[-1].get_qualitative_evaluations()
        assert scope[1].value.value == "request"
        image = pydicom.dcmread(pydicom.filebase.DicomBytesIO(base64.b64decode(row.heatmap_base64)))
        assert image.SourceImageSequence[0].ReferencedSOPInstanceUID == row.sop_instance_uid
        assert dciodvfy_errors(image) == []


def test_hostile_names_lose_no_row_and_leave_no_orphan_object(store, demo_dataset, tmp_path):
    """A PatientName holding DICOM's value separator (a backslash) defeated the writer, and the
    flag meant to say so raised (pandas' own `frame.flags`): predict wrote no CSV and left the
    film's heatmap object without a report. Names not in ASCII came out as `?`. Now every
    file is a row, a study's objects are written all or none, and what is written is valid
    DICOM holding the names as sent."""
    from tests.test_dicom import with_header

    folder = tmp_path / "in"
    studies = sorted((demo_dataset / "train").iterdir())[:3]
    for study in studies:
        shutil.copytree(study, folder / study.name)
    hostile = sorted((folder / studies[0].name).rglob("*.dcm"))[0]
    with_header(hostile, hostile, PatientName="Doe\\Jane^Q")
    for study, (fields, _) in zip(studies[1:], NAMES.values(), strict=True):
        for film in (folder / study.name).rglob("*.dcm"):  # names not in ASCII, every film
            with_header(film, film, **fields)
    table, out = predict_with_dicom_out(folder, tmp_path, batch_size=2)
    written = pd.read_csv(tmp_path / "p.csv", keep_default_na=False, dtype=str)
    assert len(written) == len(table) == len(list(folder.rglob("*.dcm")))
    assert (written.error == "").all()
    for study_folder in out.iterdir():  # a study's objects: a report and its heatmaps, or none
        assert list(study_folder.glob("sr-*.dcm")), f"orphan heatmaps in {study_folder.name}"
    for path in out.rglob("*.dcm"):
        assert dciodvfy_errors(path) == []
    names = {str(pydicom.dcmread(path).PatientName) for path in out.rglob("*.dcm")}
    assert {name for _, name in NAMES.values()} <= names
    reported = {path.name for path in out.iterdir()}
    for row in written[written.label != ""].itertuples():
        uid = as_uid(row.study_instance_uid)
        assert (uid in reported) == ("no_dicom_result" not in row.flags.split()), row.path


def two_patients_in_one_study(demo_dataset: Path, folder: Path) -> tuple[Path, Path]:
    """Two films the model knows, made one study naming two patients (what a mis-merged
    worklist produces)."""
    first, second = (sorted((demo_dataset / "train" / study.name).rglob("*.dcm"))[0]
                     for study in sorted((demo_dataset / "train").iterdir())[:2])
    study_uid = pydicom.dcmread(first).StudyInstanceUID
    made = []
    for source, patient in ((first, "PATIENT-A"), (second, "PATIENT-B")):
        ds = pydicom.dcmread(source)
        ds.StudyInstanceUID, ds.PatientID = study_uid, patient
        target = folder / "mixed" / f"{patient}.dcm"
        target.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(target)
        made.append(target)
    return made[0], made[1]


def test_a_study_naming_two_patients_gets_no_study_answer_and_no_report(store, demo_dataset,
                                                                         tmp_path):
    folder = tmp_path / "in"
    other = sorted((demo_dataset / "train").iterdir())[5]
    shutil.copytree(other, folder / other.name)
    two_patients_in_one_study(demo_dataset, folder)
    _, out = predict_with_dicom_out(folder, tmp_path, batch_size=2)
    written = pd.read_csv(tmp_path / "p.csv", keep_default_na=False, dtype=str)
    mixed = written[written.path.str.contains("/mixed/")]
    assert len(mixed) == 2 and mixed.study_instance_uid.nunique() == 1
    assert all("patient_mismatch" in flags.split() for flags in mixed["flags"])
    assert (mixed.error == "").all() and (mixed.prob_opacity != "").all()  # each its own answer
    assert not any("patient_mismatch" in flags for flags in written[~written.index.isin(
        mixed.index)]["flags"])
    studies = pd.read_csv(tmp_path / "p.studies.csv", keep_default_na=False, dtype=str)
    (study,) = studies[studies.study_instance_uid == mixed.study_instance_uid.iloc[0]].itertuples()
    assert study.label == "" and study.prob_opacity == "" and study.scored == "0"
    assert "patient_mismatch" in study.reasons.split()
    assert not (out / as_uid(mixed.study_instance_uid.iloc[0])).exists()  # no report, no heatmap
    others = written[~written.path.str.contains("/mixed/") & (written.label != "")]
    if len(others):  # the other study is reported as usual
        assert list((out / as_uid(others.study_instance_uid.iloc[0])).glob("sr-*.dcm"))


def same_study(source: Path, target: Path, study: pydicom.Dataset, **changes) -> Path:
    """`source` re-filed as a new film of `study`'s study and patient, with `changes`."""
    ds = pydicom.dcmread(source)
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "PatientBirthDate"):
        if keyword in study:
            setattr(ds, keyword, study.data_element(keyword).value)
        elif keyword in ds:
            delattr(ds, keyword)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    ds.save_as(target)
    return target


def test_a_report_counts_what_it_leaves_out_and_its_mean_is_the_study_answer(
        store, demo_dataset, tmp_path, monkeypatch):
    """A study of scored films, one whose heatmap cannot be drawn, a lateral film, an
    unreadable one and one far from the training films: the report's mean is the studies
    CSV's (to 1e-12), the heatmap failure stays in it, and the study group counts the rest.
    Before, a film without a heatmap fell out of the report (its mean differed from the CSV)
    and nothing said what was left out or to which prevalence the answer is calibrated."""
    import covid_xray.model.dicom_answers as dicom_answers

    folder = tmp_path / "in"
    study_folder = sorted((demo_dataset / "train").iterdir())[0]
    shutil.copytree(study_folder, folder / study_folder.name)
    films = sorted((folder / study_folder.name).rglob("*.dcm"))
    study = pydicom.dcmread(films[0], stop_before_pixels=True)
    extra = folder / study_folder.name / "extra"
    extra.mkdir()
    same_study(films[0], extra / "no-heatmap.dcm", study)
    same_study(films[0], extra / "lateral.dcm", study, ViewPosition="LL")
    same_study(films[0], extra / "unreadable.dcm", study, PixelData=b"\0\1")
    same_study(REAL_DICOM, extra / "far.dcm", study)  # far from the synthetic training films
    drawn = dicom_answers.overlay

    def overlay_failing_once(file, heatmap, preprocessing):
        if str(file).endswith("no-heatmap.dcm"):
            raise RuntimeError("injected: this film's heatmap cannot be drawn")
        return drawn(file, heatmap, preprocessing)

    monkeypatch.setattr(dicom_answers, "overlay", overlay_failing_once)
    table, out = predict_with_dicom_out(folder, tmp_path, batch_size=2)
    written = pd.read_csv(tmp_path / "p.csv", keep_default_na=False, dtype=str)
    reasons = dict(zip(written.path.map(lambda path: Path(path).name), written.reason,
                       strict=True))
    assert (reasons["lateral.dcm"], reasons["unreadable.dcm"], reasons["far.dcm"]) == (
        "view", "unreadable", "out_of_distribution")
    (flags,) = written[written.path.str.endswith("no-heatmap.dcm")]["flags"]
    assert "no_heatmap" in flags.split() and "no_dicom_result" not in flags.split()

    (answer,) = pd.read_csv(tmp_path / "p.studies.csv").itertuples()
    (report_path,) = out.glob("*/sr-*.dcm")
    assert dciodvfy_errors(report_path) == []
    report = hd.sr.srread(report_path)
    *film_groups, study_group = report.content.get_image_measurement_groups()
    assert len(film_groups) == answer.scored == len(films) + 1  # the heatmap failure included
    values = {item.name.meaning: item.value for item in study_group.get_measurements()}
    assert values["Probability of opacity"] == pytest.approx(answer.prob_opacity, abs=1e-12)
    assert values["Probability of negative"] == pytest.approx(answer.prob_negative, abs=1e-12)
    assert {name: value for name, value in values.items() if name.startswith("Films")} == {
        "Films scored (in the study's mean)": answer.scored,
        "Films out of distribution (not in the mean)": 1,
        "Films refused (not in the mean)": 2, "Films refused: unreadable": 1,
        "Films refused: view": 1}
    prevalence = load("models:/covid-xray-densenet/Production").operating.training_prevalence
    assert (values["Training prevalence of negative"],
            values["Training prevalence of opacity"]) == pytest.approx(prevalence, abs=1e-12)
    assert study_group.get_qualitative_evaluations()[1].value.value == "folder"
    heatmaps = list(out.glob("*/sc-*.dcm"))
    assert len(heatmaps) == len(films)  # none for the film whose heatmap failed
    labels = table.set_index("sop_instance_uid").label
    for path in heatmaps:
        image = pydicom.dcmread(path)
        label = labels[image.SourceImageSequence[0].ReferencedSOPInstanceUID]
        assert f"Grad-CAM of class {label}," in image.ImageComments


def test_no_failure_reaches_the_caller_as_an_exception(store, demo_dataset, monkeypatch):
    """Served, an exception out of predict is an HTTP 400 with a stack trace (server paths,
    header values). A failure in the DICOM-results path costs the request its objects only
    (scored rows flagged `no_dicom_result`); any other is each row's error."""
    import covid_xray.model.dicom_answers as dicom_answers
    import covid_xray.model.pyfunc as pyfunc

    films = sorted((demo_dataset / "train").rglob("*.dcm"))[:3]
    frame = pd.DataFrame({"dicom_base64": [encode_dicom(str(path)) for path in films]})
    model = load("models:/covid-xray-densenet/Production")
    plain = model.predict(None, frame)

    def broken(*args, **kwargs):
        raise RuntimeError("/srv/models/secret: injected")

    monkeypatch.setattr(dicom_answers, "left_out", broken)
    answer = model.predict(None, frame, params={"dicom_results": True})
    pd.testing.assert_frame_equal(answer[plain.columns].drop(columns="flags"),
                                  plain.drop(columns="flags"))
    assert (answer.sr_base64 == "").all() and (answer.heatmap_base64 == "").all()
    assert [("no_dicom_result" in flags.split()) for flags in answer["flags"]] == [
        bool(label) for label in plain.label]

    monkeypatch.setattr(pyfunc, "decode", broken)
    answer = model.predict(None, frame, params={"dicom_results": True})
    assert list(answer.error) == [f"row {row}: the model could not score this input "
                                  "(RuntimeError)" for row in range(3)]
    assert (answer.reason == "model_error").all() and (answer.label == "").all()
    assert (answer.sr_base64 == "").all() and "secret" not in answer.to_string()


def test_the_same_answer_is_the_same_object_and_another_is_not(tmp_path):
    """Result UIDs are derived from what a result is about: made again (a rerun, a resend),
    a report and a heatmap keep their SOP and series UIDs, so a PACS files them once; another
    model version, or a study with one more film, gets new ones."""
    first_path = siim_film(tmp_path / "a.dcm")
    first, second = read_source(str(first_path)), read_source(str(siim_film(tmp_path / "b.dcm")))
    second.SOPInstanceUID = "1.2.3.4"
    films = np.array([[0.25, 0.75], [0.5, 0.5]])

    def report(sources, model=MODEL):
        return study_report(sources, films[: len(sources)], ["opacity"] * len(sources), model)

    def heatmap(identity=IDENTITY, pixels=""):
        results = StudyResults(ReportedModel(CLASSES, identity=identity), "folder")
        results.add(first, films[0], "opacity", pixels or pixel_digest(str(first_path)))
        return results.heatmap(first, np.zeros((48, 40, 3), np.uint8), "opacity")

    again = report([first, second])
    assert (again.SOPInstanceUID, again.SeriesInstanceUID) == (
        report([first, second]).SOPInstanceUID, report([first, second]).SeriesInstanceUID)
    assert (heatmap().SOPInstanceUID, heatmap().SeriesInstanceUID) == (
        heatmap().SOPInstanceUID, heatmap().SeriesInstanceUID)
    other_version = ReportedModel(CLASSES, MODEL.threshold, MODEL.training_prevalence,
                                  ModelIdentity(IDENTITY.name, "8", IDENTITY.run_id))
    assert report([first, second], other_version).SOPInstanceUID != again.SOPInstanceUID
    assert report([first]).SOPInstanceUID != again.SOPInstanceUID
    assert heatmap(other_version.identity).SOPInstanceUID != heatmap().SOPInstanceUID
    # A corrected film: its SOP Instance UID, new pixels. The heatmap of the first film kept
    # its UID, so an archive holding it kept the stale picture under it.
    corrected = pydicom.dcmread(first_path)
    corrected.PixelData = bytes(len(corrected.PixelData))
    corrected.save_as(tmp_path / "corrected.dcm")
    assert pixel_digest(str(tmp_path / "corrected.dcm")) != pixel_digest(str(first_path))
    assert heatmap(pixels=pixel_digest(str(tmp_path / "corrected.dcm"))).SOPInstanceUID \
        != heatmap().SOPInstanceUID
    assert study_report([first], films[:1], ["opacity"], MODEL, pixels=["other"]) \
        .SOPInstanceUID != report([first]).SOPInstanceUID
    for uid in (again.SOPInstanceUID, again.SeriesInstanceUID, heatmap().SOPInstanceUID):
        assert uid.startswith("2.25.") and len(uid) <= 64
    assert dciodvfy_errors(again) == []


def test_predict_twice_writes_the_same_objects(store, demo_dataset, tmp_path):
    folder = tmp_path / "in"
    for study in sorted((demo_dataset / "train").iterdir())[:3]:
        shutil.copytree(study, folder / study.name)
    written = []
    for attempt in ("first", "second"):
        (tmp_path / attempt).mkdir()
        _, out = predict_with_dicom_out(folder, tmp_path / attempt, batch_size=2)
        written.append(sorted(path.relative_to(out) for path in out.rglob("*.dcm")))
    assert written[0] and written[0] == written[1]
