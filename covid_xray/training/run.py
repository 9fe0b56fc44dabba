"""One training run end to end: config -> data -> fit -> test -> MLflow run + registered model.

The order is chosen so that mistakes cost nothing: the tracking server and the pretrained
weights are checked first, then the data; the MLflow run starts only once training can begin,
and the model is registered only after everything else succeeded.

Under torchrun (`nproc` > 1) every process runs these steps on its share of the data
(training/distributed.py); rank 0 alone prepares the cache first and alone logs and registers.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

from covid_xray import lifecycle
from covid_xray.cli import as_arguments
from covid_xray.config import TrainConfig
from covid_xray.data.dataset import XrayDataset, build_augmentation, init_worker
from covid_xray.data.studies import CLASS_NAMES, Manifest, build_manifest
from covid_xray.errors import UserError
from covid_xray.evaluation import metrics
from covid_xray.evaluation.calibration import (
    OperatingPoint,
    fit_operating_point,
    fit_temperature,
    parse_rule,
)
from covid_xray.evaluation.outliers import fit_feature_distance
from covid_xray.evaluation.report import RESAMPLES, evaluate
from covid_xray.evaluation.subgroups import add_subgroups
from covid_xray.imaging.cache import CacheParams, ImageCache
from covid_xray.imaging.preprocess import Preprocessing
from covid_xray.imaging.workers import worker_context
from covid_xray.model.networks import Classifier, build, resolve_device
from covid_xray.model.pyfunc import DicomClassifier
from covid_xray.pseudonyms import key_fingerprint, pseudonym_key
from covid_xray.tracking import mlflow_run
from covid_xray.tracking.manifests import KEY_FINGERPRINT_TAG
from covid_xray.tracking.model_card import write_model_card
from covid_xray.training import distributed
from covid_xray.training.distributed import SOLO, World
from covid_xray.training.loop import FitResult, Recipe, fit, make_optimizer, seed_everything


@dataclass
class TrainOutcome:
    run_id: str
    model: Classifier  # on CPU, eval mode, returns probabilities
    history: list[dict[str, float]]  # one row of train/val metrics per epoch
    test_set: XrayDataset  # the test split, preprocessed as the model sees it
    test_paths: list[Path]  # its DICOMs, in the same order
    test_probabilities: np.ndarray
    test_metrics: dict[str, float]
    best_epoch: int
    model_uri: str  # the logged model
    provenance: dict[str, str]  # git_commit, git_dirty, data_fingerprint: run and version tags
    registered_version: str | None = None


def effective_config(config: TrainConfig, world: World = SOLO) -> TrainConfig:
    """torchxrayvision's pretrained DenseNets only work at 224 px: use that, and say so.
    `nproc` is the number of processes really training (torchrun's, when it started us)."""
    native = config.family.native_size
    if native is not None and config.img_size != native:
        print(f"note: {config.family.source} weights '{config.model}' need {native} px "
              f"inputs; using img_size={native} instead of {config.img_size}")
        config = dataclasses.replace(config, img_size=native)
    if config.nproc != world.size:
        if config.nproc != 1:
            print(f"note: torchrun started {world.size} processes; nproc={world.size}, "
                  f"not {config.nproc}")
        config = dataclasses.replace(config, nproc=world.size)
    return config


def check_batch_size(config: TrainConfig) -> None:
    """BatchNorm normalises each training step by its batch's own mean and spread, which a
    batch of one film does not have (PyTorch raises in the middle of the first epoch)."""
    if config.batch_size < 2:
        raise UserError(f"batch_size must be 2 or more, got {config.batch_size}: BatchNorm "
                        "normalises each step by its batch's statistics, and one film has no "
                        "spread; use 2 or more (the default is "
                        f"{TrainConfig().batch_size})")


def prepare_data(config: TrainConfig, progress: bool = True) -> Manifest:
    """The manifest: studies selected and split by patient, each with its cached image."""
    cache = ImageCache(config.cache_dir, CacheParams(config.img_size, config.apply_voi_lut))
    return build_manifest(config.data_dir, cache, num_classes=config.num_classes,
                          balance=config.balance, dataset_size=config.dataset_size,
                          split=config.split, seed=config.seed, num_workers=config.num_workers,
                          skip_unreadable=config.skip_unreadable, progress=progress)


def data_fingerprint(manifest: Manifest) -> str:
    """Hash of which studies, labels and splits a run used, and of the files' contents (the
    cache entry names are content digests): equal fingerprints mean equal training data."""
    hasher = hashlib.blake2b(digest_size=16)
    table = manifest.table
    for row, entry in zip(table.itertuples(index=False), manifest.entries, strict=True):
        hasher.update(f"{row.study_id},{row.label},{row.split},{entry.stem}\n".encode())
    return hasher.hexdigest()


@dataclass
class Prepared:
    """Everything a run needs before it starts: checked, built and loaded."""

    config: TrainConfig  # effective (the 224 px rule applied)
    device: torch.device
    network: torch.nn.Module
    manifest: Manifest
    datasets: dict[str, XrayDataset]  # each split whole
    loaders: dict[str, DataLoader]  # train: this process's shard; val, test: `world.shard`
    fingerprint: str
    world: World = SOLO
    # Set by `fit_in_run` when it logs them (rank 0), for the run's later steps:
    provenance: dict[str, str] = dataclasses.field(default_factory=dict)  # run + version tags
    logged_datasets: dict = dataclasses.field(default_factory=dict)  # MLflow datasets by split


def prepare(config: TrainConfig, progress: bool = True, world: World = SOLO) -> Prepared:
    """Check the tracking server, build the network (pretrained weights), read and split the
    data: every way to fail before an MLflow run exists. Under torchrun rank 0 does this
    first (downloading the weights, filling the cache) and the others then find it done."""
    config = effective_config(config, world)
    parse_rule(config.operating_point)  # a typo should cost nothing
    check_batch_size(config)
    device = world.device(resolve_device(config.device))
    seed_everything(config.seed)  # the same initial weights in every process

    def check_build_and_cache() -> tuple[torch.nn.Module, Manifest]:
        if world.main:
            mlflow_run.check_tracking_server()
        network = build(config.model, config.num_classes, config.drop_rate, config.weights_dir)
        lifecycle.pause_point("data")
        return network, prepare_data(config, progress and world.main)

    network, manifest = world.main_first(check_build_and_cache)
    fingerprint = data_fingerprint(manifest)
    # On several machines each reads its own data_dir and cache_dir: a different copy, or
    # another pseudonym key (which moves patients between splits), would train on other data.
    world.check_same(fingerprint, "data (studies, splits or files)",
                     "give every machine the same data_dir and cache_dir (a shared "
                     "filesystem), or the same COVID_XRAY_PSEUDONYM_KEY")
    if not world.main:
        seed_everything(config.seed + world.rank)  # its own dropout draws
    datasets = _datasets(config, manifest, world)
    return Prepared(config, device, network, manifest, datasets,
                    _loaders(config, datasets, device, world), fingerprint, world)


def train(config: TrainConfig) -> None:
    """The train entry point: this process trains, or (`nproc` > 1) `nproc` processes
    started by torchrun's launcher do, each running this same command."""
    if config.nproc < 1:
        raise UserError(f"nproc must be 1 or more, got {config.nproc}")
    check_batch_size(config)  # here, before any process starts: one line, not one per rank
    if config.nproc > 1 and not distributed.launched_by_torchrun():
        distributed.launch(config.nproc, as_arguments(config), resolve_device(config.device))
    else:
        run_training(config)


def run_training(config: TrainConfig, progress: bool = True,
                 tags: dict[str, str] | None = None) -> TrainOutcome | None:
    """Train, evaluate, log and register one model (None in a torchrun process other than
    rank 0, which has helped and logged nothing).

    Tune runs the first steps (`prepare`, `fit_in_run`) in a nested run per trial, with its
    pruning callback (validation only), and all of them (`train_in_run`, `register`) for
    register_best."""
    with distributed.joined(resolve_device(config.device)) as world:
        prepared = prepare(config, progress, world)
        config = prepared.config
        if not world.main:
            return train_in_run(prepared, progress=False)
        # A name that says what ran (MLflow's random names repeat: seed_everything seeded
        # them).
        run_name = f"train-{config.model}-{config.img_size}px-s{config.seed}"
        with mlflow_run.tracked_run(config.experiment_name, run_name=run_name,
                                    system_metrics=config.system_metrics) as run:
            outcome = train_in_run(prepared, progress=progress, tags=tags)
            register(outcome, config)
    print(f"the run in the MLflow UI: {mlflow_run.ui_link(run)}")
    return outcome


def train_in_run(prepared: Prepared, *, progress: bool = True,
                 on_epoch: Callable[[dict[str, float]], None] | None = None,
                 tags: dict[str, str] | None = None) -> TrainOutcome | None:
    """In the active MLflow run: log what goes in, fit, test, log the model and results.
    `on_epoch` sees each epoch's metrics after they are logged (and may raise to stop).

    Under torchrun every process fits and scores its share; rank 0 alone has a run and logs,
    and the others return None once their share of the test split is scored."""
    result = fit_in_run(prepared, progress=progress, on_epoch=on_epoch, tags=tags)
    return finish_model(prepared, result, progress=progress)


def fit_in_run(prepared: Prepared, *, progress: bool = True,
               on_epoch: Callable[[dict[str, float]], None] | None = None,
               tags: dict[str, str] | None = None) -> FitResult:
    """In the active MLflow run (rank 0's): log the config and the data, fit, and log the
    per-epoch train/val metrics and the learning curves. No test split, no model: what a
    tune trial records (it is chosen on val; the chosen configuration is retrained)."""
    config, manifest, world = prepared.config, prepared.manifest, prepared.world
    if world.main:
        # Which key named the manifest's patients: evaluate matches patients only under it.
        key = key_fingerprint(pseudonym_key(config.cache_dir))
        prepared.provenance = ({"data_fingerprint": prepared.fingerprint,
                                KEY_FINGERPRINT_TAG: key} | mlflow_run.git_provenance())
        mlflow.set_tags((tags or {}) | prepared.provenance)
        mlflow_run.log_params(config.as_params() | {"data_fingerprint": prepared.fingerprint,
                                                    "device_used": str(prepared.device)}
                              | {f"count/{k}": v for k, v in manifest.counts().items()})
        prepared.logged_datasets = mlflow_run.log_manifest(
            manifest.table, manifest.data_dir, prepared.fingerprint, manifest.thumbnails())

    def after_epoch(row: dict[str, float]) -> None:
        mlflow_run.log_epoch(row)
        if on_epoch is not None:
            on_epoch(row)

    network = prepared.network
    optimizer = make_optimizer(network, config.optimizer, config.lr, config.weight_decay,
                               config.momentum, config.amsgrad)
    train_labels = np.array(prepared.datasets["train"].labels)
    result = fit(network, prepared.loaders["train"], prepared.loaders["val"],
                 optimizer=optimizer, epochs=config.epochs, patience=config.patience,
                 device=prepared.device, recipe=Recipe.of(config, train_labels),
                 on_epoch=after_epoch if world.main else None,
                 progress=progress and world.main, world=world)
    if world.main:
        mlflow.log_metrics({"best_epoch": result.best_epoch,
                            "stopped_early": float(result.stopped_early)})
        mlflow_run.log_figure(metrics.learning_curves_figure(result.history), "learning_curves")
    return result


def finish_model(prepared: Prepared, result: FitResult, *,
                 progress: bool = True) -> TrainOutcome | None:
    """After `fit_in_run`: calibrate on val, fit the distance to training, score the test
    split, and log the test results and the model (rank 0; the others score their shares and
    return None)."""
    config, manifest, loaders = prepared.config, prepared.manifest, prepared.loaders
    world, network = prepared.world, prepared.network
    class_names = CLASS_NAMES[config.num_classes]
    train_labels = np.array(prepared.datasets["train"].labels)
    # The logged model runs on CPU in float32; calibrate and evaluate exactly that (its own
    # forward), so what the registry serves reproduces these numbers.
    logged = DicomClassifier(Classifier(network.cpu().float(), class_names, tta=config.tta),
                             Preprocessing.of(config), config.batch_size, config.model)
    operating = calibrate_on_val(logged, prepared, train_labels)
    fit_distance_to_training(logged, prepared)
    test_set = prepared.datasets["test"]
    probabilities, test_features = answers(logged, loaders["test"], world, with_features=True)
    if not world.main:
        return None
    run_id = mlflow.active_run().info.run_id
    mlflow.log_metrics({"calibration_temperature": operating.temperature,
                        "ood_threshold": logged.outliers.threshold,
                        "test_ood_rate": float(np.mean(logged.outliers.scores(test_features)
                                                       > logged.outliers.threshold))}
                       | ({"threshold": operating.threshold}
                          if operating.threshold is not None else {}))
    test_labels = np.array(test_set.labels)
    evaluation = evaluate(test_labels, probabilities, class_names, seed=config.seed,
                          threshold=operating.threshold, temperature=operating.temperature)
    test_paths = [manifest.data_dir / path for path in manifest.split("test").path]
    headers, _ = ImageCache(config.cache_dir, CacheParams(0)).headers(test_paths, progress)
    add_subgroups(evaluation, test_labels, probabilities, class_names, headers,
                  threshold=operating.threshold, resamples=RESAMPLES, seed=config.seed,
                  title="test")

    model_info = mlflow_run.log_model(logged)
    # Linked to the logged model and the test split (MLflow 3): the model's page shows the
    # test numbers, and search_logged_models can rank models by them.
    mlflow_run.log_evaluation(evaluation, "test", model_id=model_info.model_id,
                              dataset=prepared.logged_datasets["test"])
    print(f"run {run_id}: test ({len(test_labels)} studies) " + ", ".join(
        evaluation.line(key) for key in ("roc_auc", "accuracy", "balanced_accuracy", "ece")))
    return TrainOutcome(run_id, logged.model, result.history, test_set, test_paths,
                        probabilities, evaluation.metrics, result.best_epoch,
                        model_info.model_uri, prepared.provenance)


def answers(model: DicomClassifier, loader: DataLoader, world: World = SOLO,
            with_features: bool = False):
    """The model's probabilities for every film of a split, in order (and, asked, the
    penultimate features the distance to training is measured on). `loader` holds this
    process's `world.shard` of the split; every process gets the whole split's answers."""
    parts = [model.forward_with_features(images) for images, _ in loader]
    probabilities = world.gather_shards(np.concatenate([answer for answer, _ in parts]))
    if not with_features:
        return probabilities
    return probabilities, world.gather_shards(np.concatenate([f for _, f in parts]))


def fit_distance_to_training(model: DicomClassifier, prepared: Prepared) -> None:
    """Fit the model's distance to its training films (on the train split as the model sees
    it at prediction, without augmentation), with its threshold at the 99th percentile of
    the val split's distances."""
    config, world, train = prepared.config, prepared.world, prepared.datasets["train"]
    plain = XrayDataset(train.entries, train.labels, normalization=config.normalization,
                        input_kind=config.input_kind)
    plain_shard = DataLoader(Subset(plain, world.shard(len(plain))),
                             batch_size=config.batch_size)
    _, train_features = answers(model, plain_shard, world, with_features=True)
    _, val_features = answers(model, prepared.loaders["val"], world, with_features=True)
    model.outliers = fit_feature_distance(train_features, val_features)


def calibrate_on_val(model: DicomClassifier, prepared: Prepared,
                     train_labels: np.ndarray) -> OperatingPoint:
    """Fit the temperature and choose the threshold on the val split (the data that already
    chose the epoch; never test), set them in `model` and print them (every process computes
    the same, from the same gathered answers)."""
    rule, world = prepared.config.operating_point, prepared.world
    val_labels, val_loader = np.array(prepared.datasets["val"].labels), prepared.loaders["val"]
    temperature = fit_temperature(val_labels, answers(model, val_loader, world))
    model.set_operating_point(OperatingPoint(temperature))
    # The threshold is chosen on the calibrated answers exactly as the model gives them.
    operating = fit_operating_point(val_labels, answers(model, val_loader, world), temperature,
                                    rule, train_labels)
    model.set_operating_point(operating)
    called = (f"opacity when P(opacity) >= {operating.threshold:.4f} ({rule} on val)"
              if operating.threshold is not None else "the most probable class")
    if operating.threshold is not None and len(np.unique(val_labels)) < 2:
        called += "; the val split lacks a class, so 0.5 was kept"
    print(f"calibration: temperature {temperature:.3f}; the model calls {called}")
    return operating


def register(outcome: TrainOutcome, config: TrainConfig) -> None:
    """Register the outcome's model under `config.registered_model_name` (none: skip), tagged
    with its run, and give it the config's alias / stage. Sets `outcome.registered_version`."""
    if not config.registered_model_name:
        return
    outcome.registered_version = mlflow_run.register_model(
        outcome.model_uri, config.registered_model_name,
        tags=outcome.provenance | {"run_id": outcome.run_id}, stage=config.stage,
        alias=config.alias)
    write_model_card(config.registered_model_name, outcome.registered_version,
                     run_id=outcome.run_id)
    print(f"registered {config.registered_model_name} version {outcome.registered_version} "
          "(its model card is the version's description)")


def _datasets(config: TrainConfig, manifest: Manifest,
              world: World) -> dict[str, XrayDataset]:
    by_split = {}
    for split in ("train", "val", "test"):
        by_split[split] = XrayDataset(
            manifest.split_entries(split),
            manifest.split(split).label.tolist(),
            normalization=config.normalization,
            input_kind=config.input_kind,
            # Each process its own augmentation draws (rank 0's are a single process's).
            augmentation=(build_augmentation(config.augment(), config.seed + world.rank)
                          if split == "train" else None),
        )
        if len(by_split[split]) == 0:
            raise UserError(f"the {split} split is empty; use more studies or another split")
        if len(by_split[split]) < world.size:
            raise UserError(f"the {split} split has {len(by_split[split])} studies, fewer "
                            f"than the {world.size} processes; use more studies or a "
                            "smaller nproc")
    return by_split


def _loaders(config: TrainConfig, datasets: dict[str, XrayDataset], device: torch.device,
             world: World) -> dict[str, DataLoader]:
    by_split = {}
    for split, dataset in datasets.items():
        training = split == "train"
        # Train: a DistributedSampler, also in a world of one, so that one process under
        # torchrun trains exactly as a plain run. Val and test: this process's shard in
        # order (a DistributedSampler would pad with repeats), gathered after scoring.
        sampler = (DistributedSampler(dataset, num_replicas=world.size, rank=world.rank,
                                      shuffle=True, seed=config.seed) if training else None)
        by_split[split] = DataLoader(
            dataset if training else Subset(dataset, world.shard(len(dataset))),
            batch_size=config.batch_size,
            sampler=sampler,
            # A last training batch of one image has BatchNorm raise where the feature map is
            # 1 x 1 (img_size < 64); dropped, its studies come back in later epochs' batches.
            drop_last=training and len(sampler) > config.batch_size,
            num_workers=config.num_workers,
            persistent_workers=config.num_workers > 0,
            # Workers start after MLflow's threads (system metrics) are running: forked plainly
            # they could inherit a lock held by one of them and wait on it forever.
            multiprocessing_context=worker_context() if config.num_workers > 0 else None,
            pin_memory=device.type == "cuda",
            generator=torch.Generator().manual_seed(config.seed + world.rank),
            worker_init_fn=init_worker,
        )
    return by_split

