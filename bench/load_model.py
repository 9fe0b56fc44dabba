"""How long `mlflow.pyfunc.load_model` takes on the model train logs: cold (a fresh Python
process: imports, unpickling, weights) and warm (the same URI again in that process).

Logs a DenseNet121 wrapped as train wraps it (random weights: the size is what matters) into
a throwaway sqlite store, then times each load in new processes, --rounds times, and prints
the median of each.

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

    from covid_xray import tracking
    from covid_xray.model import Classifier, build
    from covid_xray.preprocess import Preprocessing
    from covid_xray.pyfunc import DicomClassifier

    with tempfile.TemporaryDirectory() as scratch:
        uri = f"sqlite:///{Path(scratch) / 'mlflow.db'}"
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("load-bench")
        with mlflow.start_run():
            info = tracking.log_model(DicomClassifier(
                Classifier(build("none", 2), ("negative", "positive")).eval(),
                Preprocessing(img_size)))
        timings = []
        for _ in range(rounds):
            result = subprocess.run([sys.executable, "-c", TIMER, uri, info.model_uri],
                                    capture_output=True, text=True, check=True, cwd=scratch)
            timings.append(json.loads(result.stdout.strip().splitlines()[-1]))
    cold = statistics.median(timing["cold"] for timing in timings)
    warm = statistics.median(timing["warm"] for timing in timings)
    print(f"load_model, DenseNet121 pyfunc ({info.model_uri}), median of {rounds}:")
    print(f"  cold (new process, imports included): {cold:6.2f} s")
    print(f"  warm (same URI again, same process) : {warm:6.2f} s")


if __name__ == "__main__":
    main()
