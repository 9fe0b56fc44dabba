"""How long `mlflow.pyfunc.load_model` takes on the model train logs: cold (a fresh Python
process: imports, model code, weights) and warm (the same URI again in that process).

Logs a DenseNet121 wrapped as train wraps it (random weights: the size is what matters) into
a throwaway sqlite store twice: as train logs it (models-from-code: code + state_dict) and the
old way (the python model cloudpickled whole), then times loads of each in new processes,
alternating, --rounds times, and prints the medians side by side.

    python bench/load_model.py [--img-size 224] [--rounds 3]
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import click

# Run in a fresh interpreter per round: "cold" includes importing torch and mlflow.
TIMER = """
import json, sys, time
start = time.perf_counter()
import mlflow
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model(sys.argv[2])
cold = time.perf_counter() - start
start = time.perf_counter()
mlflow.pyfunc.load_model(sys.argv[2])
warm = time.perf_counter() - start
print(json.dumps({"cold": cold, "warm": warm}))
"""


@click.command()
@click.option("--img-size", default=224, show_default=True)
@click.option("--rounds", default=3, show_default=True)
def main(img_size: int, rounds: int) -> None:
    import mlflow

    from covid_xray.imaging.preprocess import Preprocessing
    from covid_xray.model.networks import Classifier, build
    from covid_xray.model.pyfunc import DicomClassifier
    from covid_xray.tracking import mlflow_run

    model = DicomClassifier(Classifier(build("none", 2), ("negative", "opacity")),
                            Preprocessing(img_size))
    with tempfile.TemporaryDirectory() as scratch:
        uri = f"sqlite:///{Path(scratch) / 'mlflow.db'}"
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("load-bench")
        with mlflow.start_run():
            uris = {"code + state_dict (train's way)": mlflow_run.log_model(model).model_uri,
                    "cloudpickle (before)": mlflow.pyfunc.log_model(
                        name="pickled", python_model=model,
                        code_paths=[str(mlflow_run.PACKAGE_DIR)]).model_uri}
        timings: dict[str, list[dict]] = {name: [] for name in uris}
        for _ in range(rounds):
            for name, model_uri in uris.items():
                result = subprocess.run([sys.executable, "-c", TIMER, uri, model_uri],
                                        capture_output=True, text=True, check=True,
                                        cwd=scratch)
                timings[name].append(json.loads(result.stdout.strip().splitlines()[-1]))
    print(f"load_model, DenseNet121 pyfunc at {img_size} px, median of {rounds}:")
    print(f"  {'':34s} {'cold (new process)':>20s} {'warm (same process)':>20s}")
    for name, rows in timings.items():
        cold = statistics.median(row["cold"] for row in rows)
        warm = statistics.median(row["warm"] for row in rows)
        print(f"  {name:34s} {cold:18.2f} s {warm:18.2f} s")


if __name__ == "__main__":
    main()
