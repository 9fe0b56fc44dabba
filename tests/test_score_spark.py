"""Batch scoring on Spark (local[2]): the same answers as predict, as Parquet."""

from __future__ import annotations

import os
import shutil

import mlflow
import numpy as np
import pandas as pd
import pytest

from covid_xray.config import PredictConfig, ScoreSparkConfig
from covid_xray.errors import UserError
from covid_xray.serving.predict import predict_files
from tests.conftest import REAL_DICOM

pytestmark = pytest.mark.slow

try:
    import pyspark  # noqa: F401
except ImportError:
    message = "PySpark not installed (pip install -e '.[spark]')"
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)  # CI installs it: missing there is a failure
    pytest.skip(message, allow_module_level=True)

PRODUCTION = "models:/covid-xray-densenet/Production"


@pytest.fixture
def dicom_folder(demo_dataset, tmp_path):
    """SIIM-layout studies, a real film, a broken file, an upper-case .DCM, and what
    Spark's reader skips: an empty file, two links in a loop and one leading nowhere."""
    folder = tmp_path / "in"
    for study in sorted((demo_dataset / "train").iterdir())[:5]:
        shutil.copytree(study, folder / "train" / study.name)
    shutil.copy(REAL_DICOM, folder / "loose.DCM")
    (folder / "broken.dcm").write_bytes(b"garbage" * 50)
    (folder / "notes.txt").write_text("not a DICOM, not listed")
    (folder / "empty.dcm").write_bytes(b"")
    (folder / "loop-a.dcm").symlink_to(folder / "loop-b.dcm")
    (folder / "loop-b.dcm").symlink_to(folder / "loop-a.dcm")
    (folder / "dangling.dcm").symlink_to(folder / "nowhere.dcm")
    return folder


def test_a_clean_folder_is_scored_as_predict_scores_it(store, demo_dataset, tmp_path, capsys):
    """The ordinary case: every file reads, so Spark's reader skips none (the table of skipped
    rows is empty). It crashed: an empty table's error column was float, `.str` raised."""
    from covid_xray.serving.score_spark import score_spark

    folder = tmp_path / "clean"
    for study in sorted((demo_dataset / "train").iterdir())[:6]:
        shutil.copytree(study, folder / "train" / study.name)
    output = tmp_path / "clean.parquet"
    score_spark(ScoreSparkConfig(model_uri=PRODUCTION, input=str(folder), output=str(output),
                                 master="local[2]"))
    spark_rows = pd.read_parquet(output)
    spark_rows["path"] = spark_rows.path.str.removeprefix("file:")
    spark_rows = spark_rows.sort_values("path").reset_index(drop=True)
    expected = predict_files(PredictConfig(model_uri=PRODUCTION, input=str(folder),
                                           output=str(tmp_path / "clean.csv"), num_workers=0),
                             progress=False).sort_values("path").reset_index(drop=True)
    assert list(spark_rows.columns) == list(expected.columns)
    text = [name for name in expected.columns if not name.startswith(("prob_", "ood_score"))]
    pd.testing.assert_frame_equal(spark_rows[text].astype(str), expected[text].astype(str))
    probabilities = ["prob_negative", "prob_opacity"]
    np.testing.assert_allclose(spark_rows[probabilities].to_numpy(float),
                               expected[probabilities].to_numpy(float), rtol=0, atol=1e-6)
    # A distance of tens summed from float32 features in other batches: seen 1.4e-6 apart.
    np.testing.assert_allclose(spark_rows.ood_score, expected.ood_score, rtol=1e-5)
    assert len(spark_rows) == 6 and (spark_rows.error == "").all()
    assert "listed 6, scored 6, refused 0" in capsys.readouterr().out


def test_spark_rows_equal_predicts_csv(store, dicom_folder, tmp_path, capsys):
    """Row for row, predict's answers; every entry predict lists is a row (Spark's reader
    skipped the empty file and the links: 4 of 11 entries had no row, and it exited 0).
    hdfs://, s3a://: no symbolic links there, but empty files, which Spark's reader skips:
    Hadoop's listing (here on file://, the same API) names them."""
    from covid_xray.serving.score_spark import listed_files, score_spark, spark_session

    config = ScoreSparkConfig(model_uri=PRODUCTION, input=str(dicom_folder),
                              output=str(tmp_path / "scored.parquet"),
                              csv=str(tmp_path / "scored.csv"), master="local[2]",
                              files_per_batch=4)
    # The session score_spark then takes up (getOrCreate), so Spark starts once here.
    listed = listed_files(spark_session(config), f"file://{dicom_folder}", None)
    files = {f"file:{path}" for path in dicom_folder.rglob("*")
             if path.suffix.lower() == ".dcm" and not path.is_symlink()}
    assert set(listed) == files and f"file:{dicom_folder}/empty.dcm" in files

    output = tmp_path / "scored.parquet"
    score_spark(config)
    spark_rows = pd.read_parquet(output)
    spark_rows["path"] = spark_rows.path.str.removeprefix("file:")
    spark_rows = spark_rows.sort_values("path").reset_index(drop=True)
    expected = predict_files(PredictConfig(model_uri=PRODUCTION, input=str(dicom_folder),
                                           output=str(tmp_path / "p.csv"), num_workers=0),
                             progress=False)
    expected = expected.sort_values("path").reset_index(drop=True)

    assert list(spark_rows.columns) == list(expected.columns)  # predict's CSV, column by column
    assert spark_rows.path.tolist() == expected.path.tolist()  # every *.dcm, .DCM too
    for column in ("study_id", "image_id", "study_instance_uid", "sop_instance_uid", "label",
                   "reason", "flags"):
        assert spark_rows[column].tolist() == expected[column].tolist(), column
    scored = expected.error == ""
    for column in ("prob_negative", "prob_opacity"):
        np.testing.assert_allclose(spark_rows.loc[scored, column].astype(float),
                                   expected.loc[scored, column].astype(float), atol=1e-5)
    # A distance of tens from float32 features in other batches: equal to 1e-5 relative.
    np.testing.assert_allclose(spark_rows.loc[scored, "ood_score"].astype(float),
                               expected.loc[scored, "ood_score"].astype(float), rtol=1e-5)
    assert spark_rows.loc[scored, "in_distribution"].tolist() == \
        expected.loc[scored, "in_distribution"].tolist()
    broken = spark_rows[spark_rows.path.str.endswith("broken.dcm")].iloc[0]
    assert broken.error == "not a DICOM file (no 'DICM' marker)" and broken.label == ""
    assert broken.reason == "unreadable" and np.isnan(broken.prob_opacity)
    errors = dict(zip(spark_rows.path.str.rsplit("/", n=1).str[-1], spark_rows.error,
                      strict=True))
    assert errors["loop-a.dcm"] == errors["loop-b.dcm"] == \
        "cannot read (OSError: Too many levels of symbolic links)"
    assert errors["dangling.dcm"] == "cannot read (FileNotFoundError: No such file or directory)"
    assert errors["empty.dcm"].startswith("not a DICOM file")
    assert (spark_rows.error != "").sum() == 5
    assert (spark_rows.reason[spark_rows.error != ""] == "unreadable").all()
    assert spark_rows.study_id.str.fullmatch(r"[0-9a-f]{12}").sum() == len(spark_rows) - 6
    csv = pd.concat(pd.read_csv(part, keep_default_na=False)
                    for part in sorted((tmp_path / "scored.csv").glob("part-*.csv")))
    assert len(csv) == len(spark_rows)

    # A run records what was scored, by which version; no paths.
    run = mlflow.search_runs(search_all_experiments=True, output_format="list",
                             filter_string="attributes.run_name LIKE 'score_spark-%'",
                             order_by=["attributes.start_time DESC"])[0]  # this test's
    assert run.info.run_name == "score_spark-covid-xray-densenet-v1"
    assert run.data.params["count/files"] == run.data.params["count/listed"] == str(
        len(spark_rows))
    scored = int((spark_rows.label != "").sum())
    assert (run.data.params["count/scored"], run.data.params["count/refused"],
            run.data.params["count/unreadable"]) == (str(scored), "5", "5")
    assert f"listed {len(spark_rows)}, scored {scored}, refused 5 (unreadable 5)" in \
        capsys.readouterr().out
    assert str(tmp_path) not in str(run.data.params)

    # Nothing is overwritten.
    with pytest.raises(UserError, match="exists; give a new folder"):
        score_spark(ScoreSparkConfig(model_uri=PRODUCTION, input=str(dicom_folder),
                                     output=str(output), master="local[2]"))


def test_a_missing_input_is_one_line_before_spark_starts(store, tmp_path):
    from covid_xray.serving.score_spark import score_spark

    with pytest.raises(UserError, match=r"^\S*nothere: no such file or folder$"):
        score_spark(ScoreSparkConfig(model_uri=PRODUCTION, input=str(tmp_path / "nothere"),
                                     output=str(tmp_path / "o.parquet")))
    assert not (tmp_path / "o.parquet").exists()
