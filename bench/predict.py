"""Prediction cost: per-DICOM latency and folder throughput against the bare model forward.

A DenseNet121 (random weights: speed does not depend on them) wrapped as the registered model
is (pyfunc.DicomClassifier), on synthetic 2048 px 12-bit films in every encoding we support:
  latency    one DICOM per call: decode + preprocess + forward;
  folder     batches of --batch-size through the same code predict_files uses;
  bare       the model's forward alone on the same, already preprocessed, batches.
Printed side by side in one run; folder / bare shows what decoding costs on top of the network.

    python bench/predict.py [--studies 18] [--size 2048] [--img-size 224] [--batch-size 16]
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import pandas as pd
import torch

from covid_xray.model import Classifier, build
from covid_xray.preprocess import Preprocessing
from covid_xray.pyfunc import DicomClassifier
from covid_xray.synthetic import ENCODINGS, make_dataset


@click.command()
@click.option("--studies", default=2 * len(ENCODINGS), show_default=True)
@click.option("--size", default=2048, show_default=True, help="Rows of each film.")
@click.option("--img-size", default=224, show_default=True, help="Model input side.")
@click.option("--batch-size", default=16, show_default=True)
def main(studies: int, size: int, img_size: int, batch_size: int) -> None:
    torch.manual_seed(0)
    model = DicomClassifier(Classifier(build("none", 2), ("negative", "positive")),
                            Preprocessing(img_size), batch_size=batch_size)
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = make_dataset(Path(scratch) / "data", num_studies=studies, image_size=size,
                                multi_image_studies=0, seed=0)
        paths = [str(p) for p in sorted(data_dir.glob("train/*/*/*.dcm"))]
        print(f"{len(paths)} DICOMs, {size} px, 12-bit, {len(ENCODINGS)} encodings; model "
              f"input {img_size} px; batch {batch_size}; {torch.get_num_threads()} CPU threads")
        model.predict(None, pd.DataFrame({"path": paths[:2]}))  # warm-up

        latencies = []
        for path in paths:
            start = time.perf_counter()
            model.predict(None, pd.DataFrame({"path": [path]}))
            latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        inputs: list[np.ndarray] = []
        for first in range(0, len(paths), batch_size):
            batch_inputs, _ = model.prepare(paths[first : first + batch_size])
            model.probabilities(batch_inputs)
            inputs += batch_inputs
        folder_rate = len(paths) / (time.perf_counter() - start)

    start = time.perf_counter()
    model.probabilities(inputs)  # the same batches, already decoded and preprocessed
    bare_rate = len(inputs) / (time.perf_counter() - start)

    print(f"latency per DICOM (median)   : {statistics.median(latencies) * 1000:8.1f} ms")
    print(f"folder throughput            : {folder_rate:8.1f} DICOMs/s")
    print(f"bare forward, same batches   : {bare_rate:8.1f} images/s")
    print(f"folder / bare = {folder_rate / bare_rate:.2f}")


if __name__ == "__main__":
    main()
