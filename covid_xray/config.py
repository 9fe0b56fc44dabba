"""Every option of every command, with its default written once.

Each command has one frozen dataclass. Click options are generated from its fields
(`covid_xray.cli.options_from`), `MLproject` mirrors them (a test checks), and training logs the
whole object as the run's params, so what ran is always what was recorded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

# Every option's allowed values, written once: the options below, the modules that implement
# them (preprocess, networks, the loop, the registry, tune's search space) and MLproject read
# these. tests/test_entrypoints.py fails when a list of them is written out anywhere else.
BALANCES = ("undersample", "weights", "none")
NORMALIZATIONS = ("minmax", "histeq", "clahe")
INPUT_KINDS = ("xrv", "imagenet")  # what a model family's weights expect (ModelFamily)
TTA_MODES = ("none", "flip")
OPTIMIZERS = ("adamw", "adam", "sgd", "rmsprop")
SCHEDULES = ("cosine", "constant")
DEVICES = ("auto", "cpu", "cuda")
STAGES = ("None", "Staging", "Production", "Archived")
HELD_STAGES = STAGES[1:3]  # the stages a version holds (None and Archived are no one's)
OVERLAP_RULES = ("refuse", "drop", "ignore_patients")
TUNE_METRICS = ("val_auc", "val_accuracy", "val_f1", "val_loss")


def option(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field carrying its CLI help (and allowed values)."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class AugmentConfig:
    """Random geometric changes for training. Off when built bare (what evaluation and a bare
    dataset want); training's own defaults are TrainConfig's (a small affine), and tune
    searches rotation 0-20 deg, scale 0-0.3, shear 0-20 deg, translation 0-0.4, hflip."""

    rotation: float = 0.0  # up to +- this many degrees
    scale: float = 0.0  # zoom by a factor in 1 +- scale
    shear: float = 0.0  # up to +- this many degrees
    translation: float = 0.0  # shift by up to +- this fraction of the side
    hflip: bool = False
    vflip: bool = False

    @property
    def enabled(self) -> bool:
        return any((self.rotation, self.scale, self.shear, self.translation, self.hflip,
                    self.vflip))


@dataclass(frozen=True)
class ModelFamily:
    """What the code knows about a `model` name, in one torch-free table (model/networks.py
    builds the network from it; preprocessing and the 224 px rule read it)."""

    source: str  # torchxrayvision, torchvision, or random (DenseNet121, random init)
    weights: str  # the weights' name in their library ('' for random init)
    input_kind: str  # xrv: 1 channel in [-1024, 1024]; imagenet: RGB, ImageNet mean / std
    native_size: int | None  # the only input side the weights work at (None: any)


XRV_WEIGHTS = ("all", "rsna", "nih", "pc", "chex", "mimic_nb", "mimic_ch")
TORCHVISION_MODELS = ("densenet121", "densenet161", "densenet169", "densenet201")
MODEL_FAMILIES: dict[str, ModelFamily] = {
    # Every torchxrayvision DenseNet was trained at 224 px, and only works there.
    **{name: ModelFamily("torchxrayvision", f"densenet121-res224-{name}", "xrv", 224)
       for name in XRV_WEIGHTS},
    # torchvision's ImageNet DenseNets pool adaptively: any side works.
    **{name: ModelFamily("torchvision", name, "imagenet", None) for name in TORCHVISION_MODELS},
    "none": ModelFamily("random", "", "xrv", None),
}
MODELS = tuple(MODEL_FAMILIES)


@dataclass(frozen=True)
class DownloadConfig:
    source: str = option("kaggle", "kaggle (the competition API), synthetic (demo data), or "
                         "the path of a competition zip or extracted folder you already have.")
    data_dir: str = option("data", "Folder the dataset lands in.")
    competition: str = option("siim-covid19-detection", "kaggle: competition to fetch.")
    limit: int = option(0, "kaggle: fetch a balanced sample of this many studies file by "
                        "file instead of the whole archive (0 = everything).")
    force: bool = option(False, "Fetch and extract again even what is present and verified.")
    num_studies: int = option(400, "synthetic: number of studies to write.")
    image_size: int = option(256, "synthetic: rows of each generated film (columns vary "
                             "+-20%).")
    seed: int = option(0, "synthetic: random seed.")


@dataclass(frozen=True)
class TrainConfig:
    # --- data ---
    data_dir: str = option("data", "SIIM-layout dataset (see data/README.md).")
    num_classes: int = option(2, "2: negative vs opacity (SIIM's typical, indeterminate and "
                              "atypical appearances together); 4: SIIM's classes.")
    balance: str = option("undersample", "Class balance: undersample (binary: as many opacity "
                          "studies as negatives, drawn at random), weights (every study, loss "
                          "weighted by inverse class frequency) or none (every study, plain "
                          "loss).", BALANCES)
    dataset_size: int = option(0, "Cap on the number of studies, stratified (0 = all).")
    split: str = option("60,20,20", "train,val,test proportions, stratified by label, split "
                       "by patient.")
    seed: int = option(0, "Seeds the selection, split, weights init, batch order and "
                    "augmentation.")
    # --- preprocessing (one path for training and prediction) ---
    img_size: int = option(128, "Square side in pixels (torchxrayvision weights need 224, and "
                        "get it).")
    normalization: str = option("minmax", "Contrast normalisation.", NORMALIZATIONS)
    apply_voi_lut: bool = option(True, "Apply each file's VOI LUT / window when present.")
    cache_dir: str = option("cache", "Decoded-image cache, shared by runs.")
    skip_unreadable: bool = option(False, "Train without the studies whose DICOM cannot be "
                                   "read (counted as count/dropped_unreadable) instead of "
                                   "stopping.")
    # --- augmentation (train split only): a small affine suits frontal chest films ---
    rotation: float = option(5.0, "Random rotation, +- degrees.")
    scale: float = option(0.1, "Random zoom, factor in 1 +- scale.")
    shear: float = option(0.0, "Random shear, +- degrees.")
    translation: float = option(0.05, "Random shift, +- fraction of the side.")
    hflip: bool = option(False, "Random horizontal flips (the heart changes side).")
    vflip: bool = option(False, "Random vertical flips (never seen on real films).")
    # --- model ---
    model: str = option("all", "torchxrayvision weights (all, rsna, nih, pc, chex, mimic_nb, "
                        "mimic_ch), a torchvision DenseNet, or none (DenseNet121, random "
                        "init).", MODELS)
    drop_rate: float = option(0.0, "Dropout after each dense layer.")
    weights_dir: str = option("", "torchxrayvision weights folder (default "
                              "~/.torchxrayvision/models_data).")
    tta: str = option("none", "Test-time augmentation, stored in the logged model so predict "
                      "and serve apply it too: none, or flip (average the film and its mirror "
                      "image).", TTA_MODES)
    # --- optimisation ---
    optimizer: str = option("adamw", "Optimiser (adamw: decoupled weight decay).",
                            OPTIMIZERS)
    lr: float = option(3e-4, "Peak learning rate.")
    schedule: str = option("cosine", "LR schedule, stepped every batch: cosine decay to 0 "
                           "after a linear warmup, or constant.", SCHEDULES)
    warmup_epochs: float = option(1.0, "cosine: linear warmup length, in epochs.")
    amsgrad: bool = option(False, "adam, adamw: use the AMSGrad variant.")
    weight_decay: float = option(0.05, "Weight decay (decoupled for adamw, an L2 term for the "
                                 "others).")
    momentum: float = option(0.9, "sgd / rmsprop momentum.")
    ema_decay: float = option(0.99, "Exponential moving average of the weights, per step (0 = "
                              "off): the average is what is validated, tested and logged.")
    label_smoothing: float = option(0.1, "Label smoothing of the training loss.")
    operating_point: str = option("youden", "Binary: how the decision threshold on calibrated "
                                  "P(opacity) is chosen on the val split: youden (max "
                                  "sensitivity + specificity), sensitivity=0.95 or "
                                  "specificity=0.95 (any target in 0..1). Stored in the model; "
                                  "4-class models call the most probable class.")
    batch_size: int = option(32, "Images per step in each process (with nproc > 1 a step "
                             "takes nproc x batch_size: scale lr with it, README).")
    epochs: int = option(20, "Epochs (the LR schedule spans them all).")
    patience: int = option(10, "Stop after this many epochs without a better val AUC.")
    grad_clip: float = option(1.0, "Clip the gradient norm to this (0 = off).")
    num_workers: int = option(2, "Processes decoding DICOMs and loading batches.")
    device: str = option("auto", "auto picks CUDA when available (then AMP and pinned "
                        "memory; both devices run channels_last).", DEVICES)
    nproc: int = option(1, "Processes training together on this machine, one per GPU "
                        "(DistributedDataParallel, started by torchrun; NCCL on GPUs, gloo on "
                        "CPU). Under `torchrun` itself, the number it started.")
    # --- tracking ---
    experiment_name: str = option("covid-xray", "MLflow experiment (a run started by "
                                  "`mlflow run` keeps its own).")
    system_metrics: bool = option(True, "Log CPU, memory and (with CUDA) GPU utilisation as "
                                  "MLflow system metrics, every 10 s: a GPU starved by DICOM "
                                  "decoding shows here.")
    registered_model_name: str = option("covid-xray-densenet", "Registry name for the model "
                                        "('' = do not register).")
    alias: str = option("", "Give the new version this alias: champion is what predict, "
                        "evaluate and serve load by default; challenger marks a candidate.")
    stage: str = option("None", "Deprecated by MLflow since 2.9 (use alias): move the new "
                        "version to this stage, archiving the previous holders.",
                        STAGES[:3])

    def augment(self) -> AugmentConfig:
        return AugmentConfig(rotation=self.rotation, scale=self.scale, shear=self.shear,
                             translation=self.translation, hflip=self.hflip, vflip=self.vflip)

    @property
    def family(self) -> ModelFamily:
        return MODEL_FAMILIES[self.model]

    @property
    def input_kind(self) -> str:
        return self.family.input_kind

    def as_params(self) -> dict[str, Any]:
        return asdict(self)


def field_names(config_class: type) -> list[str]:
    return [item.name for item in fields(config_class)]


@dataclass(frozen=True)
class PromoteConfig:
    name: str = option("covid-xray-densenet", "Registered model name.")
    version: str = option("", "Version to promote.")
    alias: str = option("", "Give it this alias (e.g. champion), moving it from the version "
                        "that held it.")
    stage: str = option("None", "Deprecated by MLflow since 2.9 (use alias): move it to this "
                        "stage, archiving the previous holders.",
                        STAGES)
    if_better: str = option("", "Only if it beats every current holder on this evaluation "
                            "metric (roc_auc, accuracy, balanced_accuracy, map, sensitivity, "
                            "specificity: higher wins; ece, brier: lower wins), measured on "
                            "the same studies for both and compared pairwise.")
    evaluate_on: str = option("", "with if_better: a labelled SIIM-layout set to evaluate "
                              "the candidate and the holders on first (existing evaluations "
                              "of the same files are reused). '' = use existing evaluations.")
    overlap: str = option("refuse", "with evaluate_on: studies a compared version was "
                          "trained or validated on are refused, or with drop left out of "
                          "that version's evaluation (the comparison uses studies both "
                          "scored).", OVERLAP_RULES)
    min_delta: float = option(0.0, "with if_better: promote only when the paired 95% interval "
                              "of (candidate - holder) lies above this (for ece and brier: "
                              "below minus this).")


@dataclass(frozen=True)
class EvaluateConfig:
    model_uri: str = option("models:/covid-xray-densenet@champion", "The model to score: "
                            "models:/<name>@<alias>, models:/<name>/<version or stage>, "
                            "runs:/...")
    data_dir: str = option("", "A labelled SIIM-layout set: train/ and "
                           "train_study_level.csv; every usable study the model never learned "
                           "from is scored. '' = the model's own logged test split.")
    overlap: str = option("refuse", "Studies of data_dir that the model was trained or "
                          "validated on (same patient, study id, image id, file or pixels, "
                          "or a near-duplicate film): refuse (stop, nothing logged) or drop "
                          "(score the others; counted as count/dropped_overlap); "
                          "ignore_patients refuses like refuse but does not match patients "
                          "(when this machine's pseudonym key is not the training one's).",
                          OVERLAP_RULES)
    output: str = option("", "Also write the per-study predictions CSV here (it is always "
                         "logged to the run).")
    batch_size: int = option(16, "DICOMs per forward pass.")
    num_workers: int = option(-1, "Processes decoding DICOMs while the model runs (-1 = one "
                              "per available core, 0 = decode in this process).")
    resamples: int = option(1000, "Stratified bootstrap resamples for the 95% CIs.")
    seed: int = option(-1, "Seeds the bootstrap (-1: the training run's seed when rescoring "
                       "its test split, else 0).")
    cache_dir: str = option("cache", "Where file digests and decoded squares are remembered "
                            "(shared with train).")
    device: str = option("auto", "Where the model answers: auto (CUDA when visible), cpu or "
                         "cuda.", DEVICES)
    experiment_name: str = option("covid-xray", "MLflow experiment (a run started by "
                                  "`mlflow run` keeps its own).")


@dataclass(frozen=True)
class PredictConfig:
    model_uri: str = option("models:/covid-xray-densenet@champion", "models:/<name>@<alias>, "
                            "models:/<name>/<version>, models:/<name>/<stage>, runs:/...")
    input: str = option("data/train", "A DICOM file, or a folder searched for *.dcm.")
    output: str = option("predictions.csv", "CSV to write, one row per DICOM.")
    batch_size: int = option(16, "DICOMs per forward pass.")
    num_workers: int = option(-1, "Processes decoding DICOMs while the model runs (-1 = one "
                              "per available core, 0 = decode in this process).")
    heatmaps: str = option("", "Folder for Grad-CAM overlay PNGs of the predicted class "
                           "('' = none).")
    dicom_out: str = option("", "Folder for DICOM results a PACS can store: a Structured "
                            "Report per study and a Grad-CAM Secondary Capture per scored "
                            "film, in <StudyInstanceUID>/ ('' = none).")
    device: str = option("auto", "Where the model answers: auto (CUDA when visible, bf16 "
                         "autocast), cpu or cuda; DICOMs are decoded on the CPU either way.",
                         DEVICES)
    experiment_name: str = option("covid-xray", "MLflow experiment of the run that records "
                                  "what was predicted (a run started by `mlflow run` keeps "
                                  "its own).")


@dataclass(frozen=True)
class ScoreSparkConfig:
    model_uri: str = option("models:/covid-xray-densenet@champion", "models:/<name>@<alias>, "
                            "models:/<name>/<version>, runs:/...; loaded once by the driver "
                            "and shipped to the executors.")
    input: str = option("data/train", "A folder, or any Hadoop-compatible path (hdfs://, "
                        "s3a://), searched recursively for *.dcm.")
    output: str = option("predictions.parquet", "Parquet folder to write, one row per DICOM "
                         "(refused when it exists).")
    csv: str = option("", "Also write the same rows as CSV into this folder ('' = no).")
    master: str = option("local[*]", "Spark master: local[*] (this machine's cores), "
                         "spark://host:7077, yarn, k8s://...; a master set by spark-submit "
                         "wins.")
    files_per_batch: int = option(32, "DICOMs handed to the model at once in each executor "
                                  "(Arrow batch size): bounds the memory a task holds.")
    experiment_name: str = option("covid-xray", "MLflow experiment of the run that records "
                                  "what was scored (a run started by `mlflow run` keeps its "
                                  "own).")


# The original project's search space (less vertical flips, which real frontal films never
# show) plus the optimiser's and the recipe's knobs. Each entry is an Optuna distribution:
# float/int with low, high (and log), or categorical with choices.
DEFAULT_SPACE: dict[str, dict[str, Any]] = {  # docs/options.md shows it (generated)
    "scale": {"type": "float", "low": 0.0, "high": 0.3},
    "shear": {"type": "float", "low": 0.0, "high": 20.0},
    "translation": {"type": "float", "low": 0.0, "high": 0.4},
    "rotation": {"type": "float", "low": 0.0, "high": 20.0},
    "hflip": {"type": "categorical", "choices": [True, False]},
    "lr": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True},
    "weight_decay": {"type": "float", "low": 1e-4, "high": 0.3, "log": True},
    "label_smoothing": {"type": "float", "low": 0.0, "high": 0.2},
    "drop_rate": {"type": "float", "low": 0.0, "high": 0.5},
    "optimizer": {"type": "categorical", "choices": list(OPTIMIZERS)},
    "amsgrad": {"type": "categorical", "choices": [True, False]},
    "normalization": {"type": "categorical", "choices": list(NORMALIZATIONS)},
    "batch_size": {"type": "categorical", "choices": [16, 32, 64]},
}

@dataclass(frozen=True)
class TuneConfig:
    n_trials: int = option(30, "Trials in the study, every worker on every machine together "
                           "(failed ones are not counted): a worker stops when the study has "
                           "them; raise it to add trials to a finished study.")
    timeout: float = option(0.0, "Start no new trial after this many seconds (0 = no limit).")
    metric: str = option("val_auc", "Objective: this validation metric at the restored best "
                         "epoch; maximised (val_loss is minimised).",
                         TUNE_METRICS)
    space: str = option("", "YAML/JSON file replacing the search space ('' = the built-in "
                        "one, config.DEFAULT_SPACE: docs/options.md).")
    storage: str = option("", "Optuna RDB URL, e.g. postgresql://user@host/db, shared by "
                          "workers on several machines; no password here (use PGPASSWORD, "
                          "~/.pgpass or $OPTUNA_STORAGE). '' = $OPTUNA_STORAGE, else "
                          "optuna.db beside the tracking store.")
    study_name: str = option("covid-xray", "Study to create, or join when it exists.")
    sampler_seed: int = option(-1, "TPE sampler seed. -1: a fresh seed for each worker "
                               "(logged), so workers started together explore different "
                               "configurations; >= 0: that seed, offset by the trials already "
                               "in the study, so a single-worker study repeats exactly.")
    register_best: bool = option(False, "Retrain the best configuration and register it as "
                                 "train does.")
    heartbeat: int = option(30, "Seconds between a worker's liveness signals; a trial silent "
                            "for 3x this is failed and its MLflow runs marked KILLED.")
    workers: int = option(1, "Worker processes on this machine, all on the one study "
                          "(n_trials counts the study's trials). With CUDA, worker k gets GPU "
                          "k mod #GPUs; on CPU the cores are divided between them.")


PACS_ACTIONS = ("serve", "status", "retry")


@dataclass(frozen=True)
class PacsConfig:
    ae_title: str = option("COVIDXRAY", "This node's AE title (what the PACS calls it).")
    host: str = option("127.0.0.1", "Address to listen on (0.0.0.0: every interface; only "
                       "where a firewall decides who may connect).")
    port: int = option(11112, "DICOM port to listen on.")
    callers: str = option("*@127.0.0.1", "Who may send, comma-separated AET@HOST (an AE "
                          "title or *, at an address or *); others are rejected at "
                          "association.")
    study_quiet_s: float = option(60.0, "A study is complete when none of its instances has "
                                  "arrived for this many seconds.")
    model_uri: str = option("models:/covid-xray-densenet@champion", "The model that scores "
                            "each study, resolved again for every study (a moved alias is "
                            "picked up without a restart).")
    send_to: str = option("", "Where results go: dicomweb:URL (STOW-RS, confirmed by "
                          "QIDO-RS) or dimse:AET@HOST:PORT (C-STORE); '' = keep them in "
                          "state_dir/results.")
    state_dir: str = option("pacs-state", "The spool of received films and the ledger "
                            "(ledger.sqlite) of every study; a restart carries on from it.")
    retry_for_h: float = option(24.0, "How long a study's results are sent again after a "
                                "failed send (waits double from 1 s, at most 10 min between: "
                                "a PACS restarting or down for an upgrade is waited out); "
                                "then the study is failed.")
    max_spool_gb: float = option(10.0, "The spool's size cap: past it a C-STORE is answered "
                                 "'out of resources' (0xA700).")
    min_free_gb: float = option(1.0, "Free disk every write of the node leaves: below it a "
                                "C-STORE is answered 0xA700 and scoring waits.")
    max_results_gb: float = option(10.0, "With no send_to: the results kept in state_dir/"
                                   "results, the oldest deleted past this (with send_to, "
                                   "results go once the destination confirms them).")
    keep_failed_days: float = option(14.0, "How long a failed study's films and results are "
                                     "kept for action=retry; then deleted, with a log line.")
    pull: str = option("", "One-shot: dicomweb:URL to fetch `study` from (WADO-RS), score "
                       "and send as the node does, then exit ('' = run the node).")
    study: str = option("", "StudyInstanceUID to pull (with `pull`); with action=retry, the "
                        "study to queue again (its UID, or the pseudonym `status` prints).")
    action: str = option("serve", "serve: run the node (or, with `pull`, one study); status: "
                         "print where its studies stand, spool, results and free disk; retry: "
                         "queue its failed studies again (all, or `study`). status and retry "
                         "start no MLflow run and are safe while the node runs.", PACS_ACTIONS)
    device: str = option("auto", "Where the model answers: auto, cpu or cuda.", DEVICES)
    experiment_name: str = option("covid-xray", "MLflow experiment of the node's session run "
                                  "(a run started by `mlflow run` keeps its own).")
