"""The PACS node's cost: N studies pushed by Orthanc to the node and their results sent back
(STOW-RS, confirmed by QIDO-RS), against `-e predict` writing the same DICOM results for the
same files into a folder, in one run.

A DenseNet121 with random weights (speed does not depend on them), logged and registered as
train registers a model, in a throwaway sqlite store; synthetic SIIM-like studies. Printed:
  predict   studies per minute of predict_files with dicom_out, as the entry point runs it
            (loading the model, its decoding workers on the cores, its MLflow run), best of 2;
  node      studies per minute from the first study complete to the last one confirmed in
            Orthanc (the quiet period is not the node's work: it is excluded), and each
            study's latency beyond it: results confirmed minus (last film in + quiet), p50 and
            p95; the model is loaded before the studies arrive.
Needs Orthanc (apt-get install orthanc orthanc-dicomweb) and the pacs extra.

    python bench/pacs.py [--studies 24] [--size 1024] [--img-size 224] [--quiet 2]
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import mlflow
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/orthanc.py: the same Orthanc the tests start

from covid_xray.config import PredictConfig  # noqa: E402
from covid_xray.data.synthetic import make_dataset  # noqa: E402
from covid_xray.evaluation.calibration import OperatingPoint  # noqa: E402
from covid_xray.imaging.preprocess import Preprocessing  # noqa: E402
from covid_xray.model.networks import Classifier, build  # noqa: E402
from covid_xray.model.pyfunc import DicomClassifier  # noqa: E402
from covid_xray.serving.predict import predict_files  # noqa: E402
from covid_xray.tracking import mlflow_run  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.orthanc import Orthanc  # noqa: E402

NAME = "bench-pacs"


def register(img_size: int) -> str:
    model = DicomClassifier(Classifier(build("none", 2), ("negative", "opacity")),
                            Preprocessing(img_size), architecture="none",
                            operating=OperatingPoint(training_prevalence=(0.5, 0.5)))
    with mlflow.start_run():
        uri = mlflow_run.log_model(model).model_uri
    version = mlflow.register_model(uri, NAME).version
    mlflow.MlflowClient().set_registered_model_alias(NAME, "champion", version)
    return f"models:/{NAME}@champion"


@click.command()
@click.option("--studies", default=24, show_default=True)
@click.option("--size", default=1024, show_default=True, help="Rows of each film.")
@click.option("--img-size", default=224, show_default=True, help="Model input side.")
@click.option("--quiet", default=2.0, show_default=True, help="The node's study_quiet_s.")
def main(studies: int, size: int, img_size: int, quiet: float) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        store = f"sqlite:///{scratch / 'mlflow.db'}"
        mlflow.set_tracking_uri(store)
        os.environ["MLFLOW_TRACKING_URI"] = store
        model_uri = register(img_size)
        data = make_dataset(scratch / "data", num_studies=studies, image_size=size,
                            multi_image_studies=studies // 4, seed=0, progress=False)
        files = sorted(data.glob("train/*/*/*.dcm"))
        print(f"{studies} studies, {len(files)} films of {size} px rows; model input "
              f"{img_size} px; {os.cpu_count()} cores")

        predict_s = min(_timed_predict(model_uri, data, scratch) for _ in range(2))

        node_port = free_port()
        orthanc = Orthanc(scratch / "orthanc", free_port(), free_port(),
                          {"node": ["COVIDXRAY", "127.0.0.1", node_port]}).start()
        log = scratch / "node.log"
        with open(log, "wb") as output:
            node = subprocess.Popen(
                [sys.executable, "-m", "entrypoints.pacs", "--port", str(node_port),
                 "--model-uri", model_uri, "--state-dir", str(scratch / "state"),
                 "--study-quiet-s", str(quiet), "--device", "cpu",
                 "--send-to", f"dicomweb:{orthanc.dicomweb}"],
                cwd=ROOT, stdout=output, stderr=subprocess.STDOUT)
        try:
            while "listening as" not in log.read_text():
                time.sleep(0.2)
            ids = sorted({orthanc.upload(path) for path in files})
            ledger = scratch / "state" / "ledger.sqlite"
            _warm_up(orthanc, ids[0], ledger)  # the model loads on the first study
            orthanc.push("node", ids[1:])
            rows = _wait_for_all(ledger, len(ids))
        finally:
            node.terminate()
            node.wait(timeout=60)
            orthanc.stop()
    scored = len(ids) - 1
    complete = min(row[1] for row in rows)
    node_s = max(row[3] for row in rows) - complete
    beyond = [row[3] - (row[2] + quiet) for row in rows]
    predict_rate, node_rate = 60 * studies / predict_s, 60 * scored / node_s
    print("| path | studies/min | latency beyond the quiet period (p50 / p95) |")
    print("|---|---|---|")
    print(f"| `-e predict` with `dicom_out` | {predict_rate:.1f} | - |")
    print(f"| pacs node (Orthanc -> node -> Orthanc) | {node_rate:.1f} "
          f"({node_rate / predict_rate:.2f}x predict) | {np.percentile(beyond, 50):.2f} s / "
          f"{np.percentile(beyond, 95):.2f} s |")


def _timed_predict(model_uri: str, data: Path, scratch: Path) -> float:
    started = time.perf_counter()
    predict_files(PredictConfig(model_uri=model_uri, input=str(data / "train"),
                                output=str(scratch / "p.csv"),
                                dicom_out=str(scratch / "results"), device="cpu"),
                  progress=False)
    return time.perf_counter() - started


def _warm_up(orthanc: Orthanc, study: str, ledger: Path) -> None:
    orthanc.push("node", [study])
    _wait_for_all(ledger, 1)


def _wait_for_all(ledger: Path, count: int) -> list[tuple]:
    """(study, complete_at, last_arrival, sent_at) of the studies sent, once `count` are."""
    while True:
        if ledger.exists():
            with sqlite3.connect(ledger) as connection:
                rows = connection.execute(
                    "select study, complete_at, last_arrival, sent_at from studies "
                    "where status='sent' order by sent_at").fetchall()
            if len(rows) >= count:
                return rows[1:] if count > 1 else rows
        time.sleep(0.2)


if __name__ == "__main__":
    main()
