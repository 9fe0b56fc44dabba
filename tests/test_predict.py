"""Predicting DICOMs with the registered model: CSV, base64 input, Grad-CAM heatmaps."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import mlflow
import numpy as np
import pandas as pd
import pydicom
import pytest
from mlflow.tracking import MlflowClient

from covid_xray.config import PredictConfig
from covid_xray.data.synthetic import chest_image
from covid_xray.errors import UserError
from covid_xray.imaging.workers import available_cores, worker_count
from covid_xray.imaging.writer import write_dicom
from covid_xray.model.requests import encode_dicom
from covid_xray.serving.predict import find_dicoms, predict_files, siim_ids
from covid_xray.tracking.registry import load
from tests.conftest import REAL_DICOM, ROOT, clean_env

PRODUCTION = "models:/covid-xray-densenet/Production"


@pytest.fixture
def dicom_folder(tiny_dataset, tmp_path):
    """A SIIM tree (some studies) plus one loose real film and one broken file."""
    folder = tmp_path / "in"
    for study in sorted((tiny_dataset / "train").iterdir())[:5]:
        shutil.copytree(study, folder / "train" / study.name)
    shutil.copy(REAL_DICOM, folder / "loose.dcm")
    (folder / "broken.dcm").write_bytes(b"garbage" * 50)
    return folder


def test_csv_equals_in_process_pyfunc(store, dicom_folder, tmp_path, monkeypatch):
    output = tmp_path / "out" / "predictions.csv"
    table = predict_files(PredictConfig(model_uri=PRODUCTION, input=str(dicom_folder),
                                        output=str(output), batch_size=3), progress=False)
    written = pd.read_csv(output, keep_default_na=False, dtype={"study_id": str})
    assert list(written.columns) == ["path", "study_id", "image_id", "study_instance_uid",
                                     "series_instance_uid", "sop_instance_uid", "label",
                                     "prob_negative", "prob_opacity", "ood_score",
                                     "in_distribution", "reason", "flags", "error"]
    paths = find_dicoms(dicom_folder)
    assert written.path.tolist() == [str(path) for path in paths]

    monkeypatch.setenv("COVID_XRAY_PATH_ROOT", str(dicom_folder))
    expected = load(PRODUCTION).predict(None, pd.DataFrame({"path": written.path}))
    ok = written.error == ""
    np.testing.assert_allclose(written.loc[ok, ["prob_negative", "prob_opacity"]].astype(float),
                               expected.loc[ok, ["prob_negative", "prob_opacity"]], rtol=1e-6)
    assert written.label.tolist() == expected.label.tolist()

    broken = written[written.path.str.endswith("broken.dcm")].iloc[0]
    assert "not a DICOM file" in broken.error and broken.label == "" and broken.prob_negative == ""
    assert broken.reason == "unreadable" and broken.sop_instance_uid == ""
    # Scored rows are keyed by what DICOM knows: the film's own UIDs, read from its header.
    loose = written[written.path.str.endswith("loose.dcm")].iloc[0]
    assert loose.sop_instance_uid == "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819"
    assert loose["flags"] == ""  # a PA chest film: nothing for the gate to note, but a real
    # film is far from the synthetic films this model learned from:
    assert (loose["reason"], loose["label"], str(loose["in_distribution"])) == (
        "out_of_distribution", "", "False")
    assert broken.in_distribution == "" and broken.ood_score == ""  # not scored: unknown
    assert ok.sum() == len(written) - 1
    siim = written[written.path.str.contains("/train/")]
    assert siim.study_id.str.fullmatch(r"[0-9a-f]{12}").all()
    assert written[written.path.str.endswith("loose.dcm")].study_id.iloc[0] == ""

    # A run records what was predicted, named for the version that answered, in an
    # experiment that opens on its runs (not MLflow 3's GenAI overview); no paths in it.
    client = MlflowClient()
    (run,) = [run for run in mlflow.search_runs(search_all_experiments=True,
                                                output_format="list",
                                                order_by=["attributes.start_time DESC"])
              if run.info.run_name.startswith("predict-")][:1]
    assert run.info.run_name == "predict-covid-xray-densenet-v1"
    assert run.data.tags["model_version"] == "1"
    params = run.data.params
    assert (params["count/files"], params["count/unreadable"]) == (str(len(written)), "1")
    assert int(params["count/negative"]) + int(params["count/opacity"]) == (
        written.label != "").sum() == ok.sum() - int(params["count/out_of_distribution"])
    assert not client.list_artifacts(run.info.run_id)
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "covid-xray"
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert len(table) == len(written)


def test_parallel_decoding_writes_exactly_the_single_process_csv(store, dicom_folder,
                                                                  tmp_path):
    """Same bytes with 0 (in process), 2 and 3 workers: order, probabilities, errors."""
    for bad in range(2):  # unreadable files in the middle of a batch, not only at the end
        (dicom_folder / "train" / f"zz-broken-{bad}.dcm").write_bytes(b"DICM" * 40)
    written = []
    for workers in (0, 2, 3):
        output = tmp_path / f"w{workers}.csv"
        predict_files(PredictConfig(model_uri=PRODUCTION, input=str(dicom_folder),
                                    output=str(output), batch_size=2, num_workers=workers),
                      progress=False)
        written.append(output.read_bytes())
    assert written[0] == written[1] == written[2]
    table = pd.read_csv(tmp_path / "w0.csv", keep_default_na=False)
    assert (table.error != "").sum() == 3


def test_worker_count():
    assert worker_count(-1, 1000) == available_cores()  # the default: one per core
    assert worker_count(8, 3) == 3  # never more workers than files
    assert worker_count(4, 1) == worker_count(0, 50) == 0  # one file, or asked for none


def test_base64_input_matches_paths(store, tiny_dataset, monkeypatch):
    model = load(PRODUCTION)
    monkeypatch.setenv("COVID_XRAY_PATH_ROOT", str(tiny_dataset))
    paths = [str(path) for path in sorted(tiny_dataset.glob("train/*/*/*.dcm"))[:4]]
    by_path = model.predict(None, pd.DataFrame({"path": paths}))
    by_bytes = model.predict(None, pd.DataFrame({"dicom_base64": [encode_dicom(p) for p in paths]
                                                 + ["%%%not base64%%%"]}))
    pd.testing.assert_frame_equal(by_path, by_bytes.iloc[:4])
    assert by_bytes.error.iloc[4] == "row 4: dicom_base64 is not valid base64"
    with pytest.raises(UserError, match="input needs a column named path or dicom_base64"):
        model.predict(None, pd.DataFrame({"file": paths}))


def test_grad_cam_heatmaps(store, dicom_folder, tmp_path):
    heatmaps = tmp_path / "heatmaps"
    table = predict_files(PredictConfig(model_uri=PRODUCTION, input=str(dicom_folder),
                                        output=str(tmp_path / "p.csv"), heatmaps=str(heatmaps)),
                          progress=False)
    written = sorted(heatmaps.rglob("*.png"))
    # One per labelled file: not for the broken one, nor for the real film this model (trained
    # on synthetic films) finds out of distribution.
    assert len(written) == (table.label != "").sum() == len(find_dicoms(dicom_folder)) - 2
    for png in written:
        source = dicom_folder / png.relative_to(heatmaps).with_suffix(".dcm")
        ds = pydicom.dcmread(source, stop_before_pixels=True)
        picture = cv2.imread(str(png))
        assert picture.shape == (ds.Rows, ds.Columns, 3)
        assert picture.std() > 1  # not constant
        # Colour only where the heatmap is: a grey film gains hue from the overlay.
        assert np.abs(picture[..., 0].astype(int) - picture[..., 2]).max() > 30


def test_predict_cli_and_bad_inputs(store, dicom_folder, tmp_path):
    script = [sys.executable, str(ROOT / "entrypoints" / "predict.py")]
    env = clean_env(MLFLOW_TRACKING_URI=store["uri"])
    output = tmp_path / "cli.csv"
    done = subprocess.run([*script, "--model-uri", "models:/covid-xray-densenet@champion",
                           "--input", str(dicom_folder / "loose.dcm"), "--output", str(output)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert len(pd.read_csv(output)) == 1
    for args, message in [
        (["--model-uri", "models:/covid-xray-densenet/Staging"],
         "error: cannot load model 'models:/covid-xray-densenet/Staging': "),
        (["--model-uri", "models:/covid-xray-densenet@nobody"],
         "error: cannot load model 'models:/covid-xray-densenet@nobody': "),
        (["--input", str(tmp_path / "absent")], f"error: {tmp_path / 'absent'}: no such file or folder"),
    ]:
        failed = subprocess.run([*script, "--input", str(dicom_folder), "--output",
                                 str(tmp_path / "never.csv"), *args], env=env,
                                capture_output=True, text=True, timeout=300)
        assert failed.returncode == 2
        lines = failed.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(message), failed.stderr
    assert not (tmp_path / "never.csv").exists()


def test_hostile_files_are_rows_and_the_good_rows_survive(store, dicom_folder, tmp_path):
    """A text WindowCenter, an empty VOILUTSequence, a decompression bomb, a blank film and a
    *.dcm link in a loop, among good films, decoded by worker processes: every file is a row,
    the bad ones with their error, the good ones with the same answer as alone."""
    from tests.test_dicom import with_header

    folder = tmp_path / "hostile"
    shutil.copytree(dicom_folder, folder)
    good = folder / "loose.dcm"
    with_header(good, folder / "text-window.dcm", WindowCenter="abc", WindowWidth="400")
    with_header(good, folder / "empty-voi.dcm", VOILUTSequence=pydicom.Sequence([]))
    with_header(good, folder / "bomb.dcm", Rows=60000, Columns=60000)
    with_header(good, folder / "blank.dcm", RescaleSlope="0", RescaleIntercept="5")
    (folder / "loop-a.dcm").symlink_to(folder / "loop-b.dcm")
    (folder / "loop-b.dcm").symlink_to(folder / "loop-a.dcm")
    output = tmp_path / "hostile.csv"
    predict_files(PredictConfig(model_uri=PRODUCTION, input=str(folder), output=str(output),
                                batch_size=4, num_workers=2), progress=False)
    written = pd.read_csv(output, keep_default_na=False).set_index("path")
    errors = {name: written.loc[str(folder / name), "error"] for name in (
        "text-window.dcm", "empty-voi.dcm", "bomb.dcm", "blank.dcm", "loop-a.dcm", "loop-b.dcm")}
    assert "malformed DICOM header (ValueError" in errors["text-window.dcm"]
    assert "malformed DICOM header" in errors["empty-voi.dcm"]
    assert "header claims 60000 x 60000 pixels" in errors["bomb.dcm"]
    assert "blank image" in errors["blank.dcm"]
    assert "cannot open (Too many levels of symbolic links)" in errors["loop-a.dcm"]
    for name, error in errors.items():
        assert error.startswith(f"{folder / name}: ") and "\n" not in error
        assert written.loc[str(folder / name), "label"] == ""
    alone = predict_files(PredictConfig(model_uri=PRODUCTION, input=str(dicom_folder),
                                        output=str(tmp_path / "alone.csv")), progress=False)
    for row in alone.itertuples():
        twin = written.loc[str(folder / Path(row.path).relative_to(dicom_folder))]
        assert twin.error == row.error.replace(str(dicom_folder), str(folder))
        if not row.error:
            assert float(twin.prob_opacity) == pytest.approx(row.prob_opacity, abs=1e-6)


def test_paths_are_read_only_under_the_folder_the_operator_names(store, tmp_path, monkeypatch):
    """In every host (a notebook here), a `path` column is refused until COVID_XRAY_PATH_ROOT
    names the folder it may point into; outside it, the refusal is the same whether or not
    the file exists; a NUL byte in a path is that row's error, not an exception."""
    model = load(PRODUCTION)
    monkeypatch.delenv("COVID_XRAY_PATH_ROOT", raising=False)
    with pytest.raises(UserError, match=r"input needs a column named dicom_base64 with at least "
                                        r"one DICOM, got columns \['path'\]; paths are read "
                                        r"only under a folder the operator names in "
                                        r"COVID_XRAY_PATH_ROOT"):
        model.predict(None, pd.DataFrame({"path": [str(REAL_DICOM)]}))
    root = tmp_path / "films"
    root.mkdir()
    shutil.copy(REAL_DICOM, root / "chest.dcm")
    monkeypatch.setenv("COVID_XRAY_PATH_ROOT", str(root))
    answer = model.predict(None, pd.DataFrame({"path": [
        "chest.dcm", str(root / "chest.dcm"), "/etc/passwd", "/no/such/file.dcm",
        "../films/../../x.dcm", "bad\x00name.dcm", "absent.dcm"]}))
    assert answer.error.tolist() == [
        "", "",
        "row 2: path is outside the folder this model reads",
        "row 3: path is outside the folder this model reads",
        "row 4: path is outside the folder this model reads",
        "row 5: path is outside the folder this model reads",
        "row 6: file not found"]
    assert answer.prob_opacity[0] == answer.prob_opacity[1]


def test_siim_ids():
    from pathlib import Path

    assert siim_ids(Path("/d/train/0123456789ab/aaaaaaaaaaaa/bbbbbbbbbbbb.dcm")) == (
        "0123456789ab", "bbbbbbbbbbbb")
    assert siim_ids(Path("/d/scans/x.dcm")) == ("", "x")


def test_a_study_of_several_films_gets_one_answer(store, tmp_path):
    """Two frontal films of one study (by StudyInstanceUID, whatever the folders) and its
    lateral view: one study row, the mean of the two scored films' probabilities, called at
    the model's threshold; the lateral is refused by the gate and named in `reasons`."""
    folder = tmp_path / "pacs-export"
    folder.mkdir()
    rng = np.random.default_rng(5)

    def film():  # drawn like the films this model was trained on
        return np.round(chest_image(rng, label=1, rows=64, cols=64)[0] * 4095)

    for name, header in (("pa.dcm", {"ViewPosition": "PA"}), ("ap.dcm", {"ViewPosition": "AP"}),
                         ("lateral.dcm", {"ViewPosition": "LL"})):
        write_dicom(folder / name, film(), study_uid="1.2.826.0.1.7", header=header)
    write_dicom(folder / "other.dcm", film(), study_uid="1.2.826.0.1.8")
    output = tmp_path / "out.csv"
    files = predict_files(PredictConfig(model_uri=PRODUCTION, input=str(folder),
                                        output=str(output), num_workers=0), progress=False)
    studies = pd.read_csv(tmp_path / "out.studies.csv", keep_default_na=False,
                          dtype={"study_instance_uid": str})
    assert studies.study_instance_uid.tolist() == ["1.2.826.0.1.7", "1.2.826.0.1.8"]
    first = studies.iloc[0]
    assert (first.files, first.scored, first.reasons) == (3, 2, "view")
    scored = files[(files.study_instance_uid == "1.2.826.0.1.7") & (files.error == "")]
    mean = scored[["prob_negative", "prob_opacity"]].mean()
    assert first.prob_opacity == pytest.approx(mean.prob_opacity, abs=1e-9)
    threshold = load(PRODUCTION).threshold
    assert first.label == ("opacity" if mean.prob_opacity >= threshold else "negative")
    lateral = files[files.path.str.endswith("lateral.dcm")].iloc[0]
    assert (lateral.reason, lateral.label) == ("view", "")
    assert np.isnan(lateral.prob_opacity)


def test_a_photograph_is_out_of_distribution_and_unseen_films_are_not(store, tmp_path):
    """A photograph written as a CR DICOM (matplotlib's sample portrait) passes every header
    check, so only the model's distance to its training films can tell: it is flagged
    out_of_distribution (probabilities kept for audit, no label), while at least 95% of
    films the model never saw, drawn like its training films, pass."""
    import matplotlib.cbook
    import matplotlib.image

    from covid_xray.data.synthetic import make_dataset

    folder = tmp_path / "in"
    unseen = make_dataset(folder / "unseen", num_studies=60, image_size=64,
                          multi_image_studies=0, seed=123, progress=False)
    portrait = matplotlib.image.imread(matplotlib.cbook.get_sample_data("grace_hopper.jpg"))
    gray = portrait[..., :3].mean(axis=2)
    write_dicom(folder / "photo.dcm", np.round(gray / gray.max() * 4095))
    table = predict_files(PredictConfig(model_uri=PRODUCTION, input=str(folder),
                                        output=str(tmp_path / "out.csv"), num_workers=0),
                          progress=False)
    photo = table[table.path.str.endswith("photo.dcm")].iloc[0]
    assert (photo.reason, photo.label, photo.error) == ("out_of_distribution", "", "")
    assert not photo.in_distribution and not np.isnan(photo.prob_opacity)
    assert photo.ood_score > load(PRODUCTION).outliers.threshold
    films = table[table.path.str.startswith(str(unseen))]
    assert len(films) == 60 and (films.error == "").all()
    assert films.in_distribution.astype(bool).mean() >= 0.95, films.ood_score.describe()
