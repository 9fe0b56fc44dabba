"""The training recipe, measured on real chest X-rays: several seeds, each its own resplit.

Development data: PneumoniaMNIST's training split (real paediatric chest films, CC BY 4.0,
28 px, 0 = normal, 1 = pneumonia), which the repository does not carry: `pneumoniamnist.npz`
of MedMNIST v2 (https://medmnist.com; `pip install medmnist`, then
`medmnist.PneumoniaMNIST(split="train", download=True)` puts it in ~/.medmnist). Its train
split has 4,708 films (make-tree writes 4,280 to train on and 428 unseen); docs/recipe.md's
numbers come from a 2,428-film subset of it (2,000 and 428). `make-tree` turns the
npz into two SIIM-layout DICOM trees with our own writer, upsampled (bicubic) to 12-bit films:
`<out>/train` for training (split by `train` into train/val/test as usual) and `<out>/unseen`,
films the training never sees, scored afterwards through the logged model's own predict path.
Normal films are labelled Negative, pneumonia Typical (the binary task).

    python bench/recipe.py make-tree --npz ~/.medmnist/pneumoniamnist.npz --out dev
    python bench/recipe.py compare --data dev --seeds 0,1,2 --recipe before --recipe default

Every run is tracked in MLflow (experiment `recipe`, tag `recipe`, metric `unseen_auc`). The
table printed at the end is, per recipe, mean +- sd over seeds of the own test split's AUC and
of the unseen films' AUC (also with flip TTA applied to the same weights), the mean swing of
val AUC from epoch to epoch late in training (sd over epochs 5-10), and the wall seconds per
epoch (data preparation and the test split included), recipes side by side in one run.
"""

from __future__ import annotations

import csv
import statistics
import time
from pathlib import Path

import click
import cv2
import mlflow
import numpy as np
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from covid_xray.config import TrainConfig
from covid_xray.data.studies import CLASS_COLUMNS, STUDY_CSV
from covid_xray.imaging.preprocess import Preprocessing
from covid_xray.imaging.workers import decode
from covid_xray.imaging.writer import write_dicom
from covid_xray.model.pyfunc import DicomClassifier
from covid_xray.training.run import run_training

# Recipes are overrides of TrainConfig's defaults; "default" is whatever the defaults are now.
# "before" is the recipe before issue #11 (no schedule, no averaging, no augmentation).
RECIPES: dict[str, dict[str, object]] = {
    "default": {},
    "before": {"optimizer": "adam", "weight_decay": 0.0, "schedule": "constant",
               "warmup_epochs": 0.0, "ema_decay": 0.0, "label_smoothing": 0.0,
               "rotation": 0.0, "scale": 0.0, "translation": 0.0, "hflip": False,
               "dataset_size": 640, "tta": "none"},
    "no-ema": {"ema_decay": 0.0},
    "no-augment": {"rotation": 0.0, "scale": 0.0, "translation": 0.0},
    "no-schedule": {"schedule": "constant", "warmup_epochs": 0.0},
    "no-smoothing": {"label_smoothing": 0.0},
    "hflip": {"hflip": True},
    "tta": {"tta": "flip"},
    "adam": {"optimizer": "adam", "weight_decay": 0.0},
    "cap-640": {"dataset_size": 640},
}
# What the issue fixes; everything else is the recipe's defaults.
GIVEN = {"model": "none", "img_size": 64, "epochs": 10, "batch_size": 64}


@click.group()
def main() -> None:
    """Development data and recipe comparisons."""


@main.command("make-tree")
@click.option("--npz", "npz_path", required=True,
              help="MedMNIST's pneumoniamnist.npz (its train_images, train_labels)")
@click.option("--out", required=True, help="Folder to create (train/ and unseen/).")
@click.option("--size", default=256, show_default=True, help="Upsampled film side, px.")
@click.option("--unseen", default=428, show_default=True, help="Films held out of train/.")
def make_tree(npz_path: str, out: str, size: int, unseen: int) -> None:
    data = np.load(npz_path)
    images, labels = data["train_images"], data["train_labels"].ravel().astype(int)
    rng = np.random.default_rng(2026)
    order = rng.permutation(len(labels))
    # Hold out a label-balanced unseen set: `unseen` films, half of each class.
    held = np.concatenate([order[labels[order] == label][: unseen // 2] for label in (0, 1)])
    parts = {"unseen": held, "train": np.setdiff1d(order, held)}
    for name, indices in parts.items():
        _write_tree(Path(out) / name, images[indices], labels[indices], size, rng)
        print(f"{name}: {len(indices)} studies ({int(labels[indices].sum())} pneumonia)")


def _write_tree(folder: Path, images: np.ndarray, labels: np.ndarray, size: int,
                rng: np.random.Generator) -> None:
    if folder.exists():
        raise click.ClickException(f"{folder} exists; remove it or choose another --out")
    rows = []
    for image, label in tqdm(zip(images, labels, strict=True), total=len(labels),
                             desc=folder.name):
        study, series, instance = (rng.bytes(6).hex() for _ in range(3))
        film = cv2.resize(image.astype(np.float32) / 255.0, (size, size),
                          interpolation=cv2.INTER_CUBIC)
        path = folder / "train" / study / series / f"{instance}.dcm"
        path.parent.mkdir(parents=True)
        write_dicom(path, np.round(np.clip(film, 0, 1) * 4095), patient_id=study)
        # Negative vs Typical: the binary task (negative vs non-negative).
        rows.append([f"{study}_study", int(label == 0), int(label == 1), 0, 0])
    with open(folder / STUDY_CSV, "w", newline="") as file:
        csv.writer(file).writerows([["id", *CLASS_COLUMNS], *rows])


@main.command()
@click.option("--data", required=True, help="The folder make-tree wrote.")
@click.option("--seeds", default="0,1,2", show_default=True)
@click.option("--recipe", "recipes", multiple=True, default=("before", "default"),
              show_default=True, type=click.Choice(sorted(RECIPES)))
@click.option("--cache-dir", default="cache-recipe", show_default=True)
@click.option("--num-workers", default=2, show_default=True)
def compare(data: str, seeds: str, recipes: tuple[str, ...], cache_dir: str,
            num_workers: int) -> None:
    unseen_paths, unseen_labels = _labelled_films(Path(data) / "unseen")
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in recipes}
    for seed in (int(value) for value in seeds.split(",")):
        for name in recipes:  # recipes alternate within a seed: drift hits them alike
            config = TrainConfig(**GIVEN | RECIPES[name] | {
                "seed": seed, "data_dir": str(Path(data) / "train"), "cache_dir": cache_dir,
                "num_workers": num_workers, "registered_model_name": "",
                "experiment_name": "recipe", "system_metrics": False})
            start = time.perf_counter()
            outcome = run_training(config, progress=False, tags={"recipe": name})
            per_epoch = (time.perf_counter() - start) / len(outcome.history)
            classifier = DicomClassifier(outcome.model, Preprocessing.of(config), batch_size=64)
            inputs = [decode(classifier.preprocessing, path) for path in unseen_paths]
            assert not any(item.error for item in inputs), [item.error for item in inputs]
            # The same weights scored with and without flip TTA (the model applies it).
            unseen = {}
            for tta in ("none", "flip"):
                outcome.model.tta = tta
                unseen[tta] = roc_auc_score(unseen_labels,
                                            classifier.probabilities(inputs)[:, 1])
            outcome.model.tta = config.tta
            mlflow.MlflowClient().log_metric(outcome.run_id, "unseen_auc",
                                             unseen[config.tta])
            mlflow.MlflowClient().log_metric(outcome.run_id, "unseen_auc_flip_tta",
                                             unseen["flip"])
            # How much val AUC swings from epoch to epoch late in training (epochs 5-10).
            swing = statistics.pstdev(row["val_auc"] for row in outcome.history[4:])
            results[name].append((outcome.test_metrics["roc_auc"], unseen[config.tta],
                                  unseen["flip"], swing, per_epoch))
            print(f"seed {seed} {name}: test auc {outcome.test_metrics['roc_auc']:.4f} "
                  f"unseen auc {unseen[config.tta]:.4f} (flip TTA {unseen['flip']:.4f}; "
                  f"{per_epoch:.1f} s/epoch, includes data and test)", flush=True)

    print(f"\n{'recipe':<14}{'test AUC':>18}{'unseen AUC':>18}{'unseen, flip TTA':>18}"
          f"{'val AUC swing':>15}{'s/epoch':>9}  seeds {seeds}")
    for name, rows in results.items():
        test, unseen_auc, flipped, swing, seconds = (list(column)
                                                     for column in zip(*rows, strict=True))
        print(f"{name:<14}{_mean_sd(test):>18}{_mean_sd(unseen_auc):>18}"
              f"{_mean_sd(flipped):>18}{statistics.mean(swing):>15.4f}"
              f"{statistics.mean(seconds):>9.1f}  unseen range "
              f"{max(unseen_auc) - min(unseen_auc):.4f}")


def _labelled_films(folder: Path) -> tuple[list[str], np.ndarray]:
    with open(folder / STUDY_CSV, newline="") as file:
        label_of = {row["id"].removesuffix("_study"): 1 - int(row[CLASS_COLUMNS[0]])
                    for row in csv.DictReader(file)}
    paths = sorted(str(path) for path in (folder / "train").rglob("*.dcm"))
    return paths, np.array([label_of[Path(path).parts[-3]] for path in paths])


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} +- {sd:.4f}"


if __name__ == "__main__":
    main()
