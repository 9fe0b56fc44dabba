"""Batch scoring on Spark: a folder, or any Hadoop-compatible path, of DICOMs -> Parquet.

Spark does the distributing and MLflow the model shipping; we write neither. Files are read
with Spark's `binaryFile` source, their bytes handed as base64 to the registered model as an
MLflow `spark_udf` (the same pyfunc `mlflow models serve` runs: the input gate, calibration,
out-of-distribution score and all), and the rows written as Parquet with the columns of
predict's CSV. The same command runs on this machine (`master=local[*]`) and on any cluster
(`spark-submit`, whose master wins).

Each executor decodes in its own Python workers, `files_per_batch` files at a time (Arrow's
batch: Spark's default of 10,000 rows would hold 10,000 films in memory at once).

Every file predict would list is a row. Spark's reader skips some silently (empty files,
symbolic links, dangling or looping), so the listing is ours: predict's `find_dicoms` for a
local folder, Hadoop's recursive listing elsewhere; what the reader skipped is read on the
driver (a handful of files, none of them a film) and gets its row with its error.
"""

from __future__ import annotations

import io
import os
import shutil
import sys
import uuid
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import pandas as pd

from covid_xray.config import ScoreSparkConfig
from covid_xray.errors import DicomError, UserError, first_line
from covid_xray.imaging.workers import decode
from covid_xray.model.answers import TEXT_COLUMNS
from covid_xray.serving.predict import (
    HEX12,
    find_dicoms,
    record_scoring,
    scoring_counts,
    siim_ids,
)
from covid_xray.tracking import mlflow_run, registry

SPARK_HINT = "pip install -e '.[spark]' (PySpark) and Java 17+ (apt-get install " \
             "openjdk-17-jre-headless)"


def score_spark(config: ScoreSparkConfig) -> pd.DataFrame:
    """Score every DICOM under `config.input` on Spark; write `config.output` (Parquet) and,
    when asked, `config.csv`; record the run; return the label counts."""
    try:
        import pyspark  # noqa: F401 (an optional extra: say so before any work)
    except ImportError:
        raise UserError(f"score_spark needs PySpark: {SPARK_HINT}") from None
    mlflow_run.check_tracking_server()
    local_input, local_output = _local(config.input), _local(config.output)
    if local_input and not local_input.exists():
        raise UserError(f"{config.input}: no such file or folder")
    if local_output and local_output.exists():
        raise UserError(f"output {config.output} exists; give a new folder (nothing is "
                        "overwritten)")
    # Loaded here first: a bad URI fails in one line, not inside Spark.
    version, model = registry.load_resolved(config.model_uri)
    model_uri = registry.version_uri(version) if version else config.model_uri
    spark = spark_session(config)
    try:
        files = dicom_files(spark, config.input)
        listed = listed_files(spark, config.input, local_input)
        if not listed:
            raise UserError(f"{config.input}: no *.dcm files there")
        read = {row.path for row in files.select("path").collect()}
        rows = scored_rows(files, model_uri, model.class_names).unionByName(
            spark.createDataFrame(skipped_rows([path for path in listed if path not in read],
                                               model), schema=_result_schema(model.class_names)))
        _write(rows, config, local_output)
        # Counted from what was written, not by scoring again.
        written = spark.read.parquet(config.output).select("label", "error", "reason")
        table = written.toPandas()
    finally:
        spark.stop()
    run_id = record_scoring("score_spark", config.experiment_name, config.model_uri, version,
                            table, model.class_names,
                            {"master": config.master, "files_per_batch": config.files_per_batch})
    print(f"wrote {len(table)} rows to {config.output}"
          + (f" and {config.csv}" if config.csv else "") + f": {scoring_counts(table)}; "
          f"run {run_id}")
    return table


def spark_session(config: ScoreSparkConfig):
    """The Spark session score_spark runs in (bench/predict.py measures in it too)."""
    from pyspark import SparkConf
    from pyspark.sql import SparkSession

    builder = (SparkSession.builder.appName("covid-xray score_spark")
               .config("spark.sql.execution.arrow.maxRecordsPerBatch",
                       str(config.files_per_batch))
               # base64 on one line, as the model reads it (Spark's default wraps at 76).
               .config("spark.sql.chunkBase64String.enabled", "false"))
    conf = SparkConf()
    if not conf.contains("spark.master"):  # spark-submit's --master wins
        builder = builder.master(config.master)
    master = conf.get("spark.master", config.master)
    if master.startswith("local") and not (os.environ.get("PYSPARK_PYTHON")
                                           or conf.contains("spark.pyspark.python")):
        # On this machine the workers run this interpreter (a cluster names its own).
        os.environ["PYSPARK_PYTHON"] = sys.executable
    try:
        return builder.getOrCreate()
    except Exception as error:  # no Java, a master that does not answer, ...
        raise UserError(f"cannot start Spark on {config.master}: {type(error).__name__}: "
                        f"{first_line(error)} ({SPARK_HINT})") from None


def dicom_files(spark, path: str):
    """Every *.dcm (any case) under `path`, recursively: Spark's path, content, ... rows."""
    from pyspark.errors import AnalysisException

    try:
        return (spark.read.format("binaryFile").option("recursiveFileLookup", "true")
                .option("pathGlobFilter", "*.[dD][cC][mM]").load(path))
    except AnalysisException as error:  # a path that is not there (hdfs://, s3a:// too)
        raise UserError(f"{path}: cannot list it ({first_line(error)})") from None


def listed_files(spark, path: str, local: Path | None) -> list[str]:
    """Every *.dcm under `path` as Spark names it (file:/... locally): predict's listing of a
    local folder (empty files and links included), Hadoop's recursive listing elsewhere."""
    if local is not None:
        try:
            return [f"file:{found}" for found in find_dicoms(local)]
        except UserError:  # no *.dcm there: said by the caller
            return []
    hadoop = spark._jvm.org.apache.hadoop.fs
    root = hadoop.Path(path)
    found = root.getFileSystem(spark._jsc.hadoopConfiguration()).listFiles(root, True)
    listed = []
    while found.hasNext():
        name = found.next().getPath().toString()
        if name.lower().endswith(".dcm"):
            listed.append(name)
    return sorted(listed)


def skipped_rows(paths: list[str], model) -> pd.DataFrame:
    """The rows of files Spark's reader skipped (`listed_files` minus what it read), read
    here as the model reads a request's bytes: each gets predict's error for it."""
    decoded = []
    for path in paths:
        try:
            with open(path.removeprefix("file:"), "rb") as file:
                source = io.BytesIO(file.read())
            source.name = "row 0"
        except OSError as error:  # a link that leads nowhere, or in a loop
            source = DicomError(f"row 0: cannot read ({type(error).__name__}: "
                                f"{error.strerror or error})")
        decoded.append(decode(model.preprocessing, source))
    answers = model.result_frame(None, decoded=decoded)
    ids = [siim_ids(Path(path.removeprefix("file:"))) for path in paths]
    answers["path"] = paths
    answers["study_id"] = [study for study, _ in ids]
    answers["image_id"] = [image for _, image in ids]
    answers["error"] = answers.error.str.replace(r"^row [0-9]+: ", "", regex=True)
    return answers[["path", "study_id", "image_id", *_answer_columns(model.class_names)]]


def scored_rows(files, model_uri: str, class_names):
    """One row per file of `dicom_files`: path, SIIM ids, then the model's answer."""
    from pyspark.sql import functions as F

    answer = mlflow.pyfunc.spark_udf(files.sparkSession, model_uri,
                                     result_type=_result_type(class_names), env_manager="local")
    scored = files.select(
        "path", answer(F.struct(F.base64("content").alias("dicom_base64"))).alias("answer"))
    siim = rf"({HEX12.pattern})/({HEX12.pattern})/({HEX12.pattern})\.[dD][cC][mM]$"
    columns = ["path",
               F.regexp_extract("path", siim, 1).alias("study_id"),
               F.regexp_extract("path", r"([^/]+)\.[dD][cC][mM]$", 1).alias("image_id"),
               *(f"answer.{name}" for name in _answer_columns(class_names))]
    # The model names a failed row by its place in its batch ("row 3: ..."); here the path
    # beside it says which file it is.
    return scored.select(*columns).withColumn(
        "error", F.regexp_replace("error", r"^row [0-9]+: ", ""))


def _answer_columns(class_names) -> list[str]:
    """predict's CSV columns after path, study_id and image_id."""
    uids = [name for name in TEXT_COLUMNS if name.endswith("_uid")]
    return [*uids, "label", *(f"prob_{name}" for name in class_names), "ood_score",
            "in_distribution", "reason", "flags", "error"]


def _result_schema(class_names) -> str:
    """A scored row as a Spark schema (DDL): path, SIIM ids, the answer."""
    return "path string, study_id string, image_id string, " + _result_type(class_names)


def _result_type(class_names) -> str:
    """The pyfunc's answer as a Spark struct (DDL)."""
    kinds = {"ood_score": "double", "in_distribution": "boolean"} | {
        f"prob_{name}": "double" for name in class_names}
    return ", ".join(f"{name} {kinds.get(name, 'string')}"
                     for name in _answer_columns(class_names))


def _write(rows, config: ScoreSparkConfig, local_output: Path | None) -> None:
    """Parquet (and CSV). A local folder appears whole or not at all (written beside it,
    then renamed); elsewhere Spark's commit protocol applies (a _SUCCESS marker)."""
    target = config.output
    if local_output:
        target = str(local_output.with_name(f".{local_output.name}.{uuid.uuid4().hex}.tmp"))
    try:
        rows.write.mode("errorifexists").parquet(target)
        if local_output:
            os.replace(target, local_output)
    except BaseException:
        if local_output:
            shutil.rmtree(target, ignore_errors=True)
        raise
    if config.csv:
        # Written from the Parquet, so the model runs once.
        spark = rows.sparkSession
        spark.read.parquet(config.output).write.mode("errorifexists").option(
            "header", "true").csv(config.csv)


def _local(path: str) -> Path | None:
    """A local folder (no scheme, or file:), else None (hdfs://, s3a://, ...)."""
    parsed = urlparse(path)
    if parsed.scheme in ("", "file"):
        return Path(parsed.path if parsed.scheme else path).absolute()
    return None
