"""Prediction cost: folder throughput with N decoding workers against one process, and both
against the bare model forward.

A DenseNet121 (random weights: speed does not depend on them) wrapped as the registered model
wraps it (model.Classifier + preprocess.Preprocessing), on synthetic 2048 px films in every
encoding we support (8-, 12- and 16-bit; JPEG family, JPEG-LS, JPEG 2000, RLE, raw):
  latency     one DICOM at a time: decode + preprocess + forward;
  folder, Nw  the path predict_files takes (decoding.decoded_batches with N workers, then the
              batched forward), for N = 0 (decode in this process) and each --workers value;
  before      folder, in process, decoded by pydicom's own plugins (GDCM first) instead of
              our imagecodecs plugin first (covid_xray/fast_decoders.py): what that gains;
  bare        the model's forward alone on the same, already preprocessed, batches;
  spark       the same files scored by `-e score_spark`'s pipeline (binaryFile source, the model
              saved as it is logged, as an MLflow spark_udf) on Spark local[N], N = the
              cores, session and model loading warmed up first (needs the [spark] extra).
All measured in one run, side by side, repeated --rounds times (best of each): this machine
is noisy. --device cuda runs the forward with AMP + channels_last (decoding stays on CPUs).

    python bench/predict.py [--studies 36] [--repeat 4] [--workers 2] [--device cpu] [--spark]
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import torch
from common import describe, pydicom_plugins_only  # bench/common.py

from covid_xray.data.synthetic import ENCODINGS, make_dataset
from covid_xray.imaging.preprocess import Preprocessing
from covid_xray.imaging.workers import available_cores, decode, decoded_batches
from covid_xray.model.networks import Classifier, build
from covid_xray.training.loop import Stepper


@click.command()
@click.option("--studies", default=4 * len(ENCODINGS), show_default=True)
@click.option("--size", default=2048, show_default=True, help="Rows of each film.")
@click.option("--img-size", default=224, show_default=True, help="Model input side.")
@click.option("--batch-size", default=16, show_default=True)
@click.option("--workers", default="2", show_default=True,
              help="Comma-separated decoding worker counts to compare with 0.")
@click.option("--repeat", default=4, show_default=True,
              help="List each file this many times: a folder of a few hundred films, so "
                   "starting the workers (about a second) counts as it does in real use.")
@click.option("--rounds", default=2, show_default=True)
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]))
@click.option("--spark/--no-spark", default=False, show_default=True,
              help="Add the Spark local[N] row (pip install -e '.[spark]', Java 17+).")
def main(studies: int, size: int, img_size: int, batch_size: int, workers: str, repeat: int,
         rounds: int, device: str, spark: bool) -> None:
    torch.manual_seed(0)
    stepper = Stepper(torch.device(device))
    model = stepper.prepare(Classifier(build("none", 2), ("negative", "opacity")).eval())
    preprocessing = Preprocessing(img_size)

    @torch.no_grad()
    def forward(inputs: list[np.ndarray | None]) -> np.ndarray:
        batch = torch.from_numpy(np.stack([array for array in inputs if array is not None]))
        with stepper.autocast():
            return model(stepper.inputs(batch)).float().cpu().numpy()

    counts = [0, *(int(value) for value in workers.split(","))]
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = make_dataset(Path(scratch) / "data", num_studies=studies, image_size=size,
                                multi_image_studies=0, seed=0, progress=False)
        files = [str(p) for p in sorted(data_dir.glob("train/*/*/*.dcm"))]
        paths = files * repeat
        print(f"{len(files)} DICOMs x {repeat}, {size} px rows ({describe(files)}); model input "
              f"{img_size} px; batch {batch_size}; device {device}; {available_cores()} "
              f"cores, {torch.get_num_threads()} torch threads")
        forward([decode(preprocessing, paths[0]).model_input])  # warm-up

        latencies = []
        for path in files[: len(ENCODINGS)]:
            start = time.perf_counter()
            forward([decode(preprocessing, path).model_input])
            latencies.append(time.perf_counter() - start)

        folder_rates: dict[int, float] = dict.fromkeys(counts, 0.0)
        before_rate = 0.0  # in process, decoded by pydicom's own plugins only
        busy = 0.0  # cores the in-process path keeps busy: CPU seconds per wall second
        inputs: list[np.ndarray | None] = []
        for _ in range(rounds):  # the worker counts alternate, so drift hits them alike
            with pydicom_plugins_only():
                start = time.perf_counter()
                for batch in decoded_batches(paths, preprocessing, batch_size, 0):
                    forward([item.model_input for item in batch])
                before_rate = max(before_rate, len(paths) / (time.perf_counter() - start))
            for count in counts:
                cpu_before = os.times()
                start = time.perf_counter()
                decoded: list[np.ndarray | None] = []
                for batch in decoded_batches(paths, preprocessing, batch_size, count):
                    batch_inputs = [item.model_input for item in batch]
                    forward(batch_inputs)
                    decoded += batch_inputs
                wall = time.perf_counter() - start
                folder_rates[count] = max(folder_rates[count], len(paths) / wall)
                if count == 0:  # one process: its own CPU time is all of it
                    cpu_after = os.times()
                    busy = max(busy, (cpu_after.user - cpu_before.user + cpu_after.system
                                      - cpu_before.system) / wall)
                inputs = decoded
        spark_rate = (spark_throughput(model, preprocessing, data_dir, batch_size, repeat,
                                       rounds, Path(scratch)) if spark else None)

    bare_rate = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        for first in range(0, len(inputs), batch_size):
            forward(inputs[first : first + batch_size])
        bare_rate = max(bare_rate, len(inputs) / (time.perf_counter() - start))

    print(f"latency per DICOM (median)          : {statistics.median(latencies) * 1000:8.1f} ms")
    print(f"bare forward, same batches          : {bare_rate:8.1f} images/s")
    print(f"folder, in process, pydicom plugins : {before_rate:8.1f} DICOMs/s   (without "
          f"fast_decoders: in process is x{folder_rates[0] / before_rate:.2f} of this)")
    for count, rate in folder_rates.items():
        label = "in process" if count == 0 else f"{count} workers"
        print(f"folder throughput, {label:<17}: {rate:8.1f} DICOMs/s   "
              f"x{rate / folder_rates[0]:.2f} of in process, {rate / bare_rate:.2f} of bare")
    if spark_rate:
        label = f"Spark local[{available_cores()}]"
        print(f"folder throughput, {label:<17}: {spark_rate:8.1f} DICOMs/s"
              f"   x{spark_rate / folder_rates[0]:.2f} of in process, "
              f"{spark_rate / bare_rate:.2f} of bare")
    # Workers can only use the cores the single process leaves idle (the work per file stays).
    print(f"in process keeps {busy:.2f} of {available_cores()} cores busy: workers can gain "
          f"at most x{available_cores() / busy:.2f} here")


def spark_throughput(network: Classifier, preprocessing: Preprocessing, data_dir: Path,
                     batch_size: int, repeat: int, rounds: int, scratch: Path) -> float:
    """DICOMs/s of score_spark's pipeline over the folder listed `repeat` times, best of
    `rounds` (after one warm-up pass: the session and each worker's model load)."""
    from functools import reduce

    import mlflow

    from covid_xray.config import ScoreSparkConfig
    from covid_xray.model import artifacts
    from covid_xray.model.pyfunc import DicomClassifier, signature
    from covid_xray.model.requests import example_input
    from covid_xray.serving.score_spark import dicom_files, scored_rows, spark_session
    from covid_xray.tracking.mlflow_run import PACKAGE_DIR

    # Saved as training logs it: models-from-code, weights and model.json as artifacts.
    classifier = DicomClassifier(network.cpu(), preprocessing, batch_size, "none")
    (scratch / "artifacts").mkdir()
    mlflow.pyfunc.save_model(
        scratch / "model", python_model=str(PACKAGE_DIR / "model" / "served_model.py"),
        artifacts=artifacts.save(classifier, scratch / "artifacts"),
        signature=signature(classifier.class_names), input_example=example_input(),
        code_paths=[str(PACKAGE_DIR)])
    session = spark_session(ScoreSparkConfig(master=f"local[{available_cores()}]",
                                             files_per_batch=batch_size))
    session.sparkContext.setLogLevel("ERROR")
    try:
        files = dicom_files(session, str(data_dir / "train"))
        listed = reduce(type(files).unionAll, [files] * repeat)
        count = listed.count()
        rows = scored_rows(listed, str(scratch / "model"), classifier.class_names)
        best = 0.0
        for _ in range(rounds + 1):  # the first pass warms up
            start = time.perf_counter()
            rows.write.format("noop").mode("overwrite").save()
            best = max(best, count / (time.perf_counter() - start)) if _ else best
        return best
    finally:
        session.stop()


if __name__ == "__main__":
    main()
