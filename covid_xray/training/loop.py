"""The training loop: plain PyTorch, seeded, early stopping on val AUC, best weights restored.

The recipe (each part an option, chosen by measurement on real films: bench/recipe.py):
AdamW, a per-step cosine LR schedule after a linear warmup, label smoothing, and an
exponential moving average (EMA) of the weights, which is what gets validated, tested and
logged. On CUDA the loop never waits for the GPU inside an epoch: loss and outputs are
accumulated on the device and read once per epoch (and every `SYNC_EVERY` steps for the
progress bar and the divergence check).

It knows nothing of MLflow: each finished epoch is handed to an `on_epoch` callback, which the
caller uses to log (tracking/mlflow_run.py) or to report to Optuna (training/tune.py). Under
torchrun it trains this process's shard and gathers every process's answers before measuring
(training/distributed.py), so all processes see the same metrics and stop together.
"""

from __future__ import annotations

import copy
import itertools
import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader
from tqdm import tqdm

from covid_xray import lifecycle
from covid_xray.config import OPTIMIZERS, SCHEDULES, TrainConfig
from covid_xray.errors import UserError
from covid_xray.evaluation.metrics import epoch_metrics
from covid_xray.training.distributed import SOLO, World


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float = 0.0,
                   momentum: float = 0.9, amsgrad: bool = False) -> torch.optim.Optimizer:
    parameters = model.parameters()
    if name == "adamw":  # decoupled weight decay (Loshchilov & Hutter)
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, amsgrad=amsgrad)
    if name == "adam":  # weight_decay is an L2 term in the gradient here
        return torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay, amsgrad=amsgrad)
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, weight_decay=weight_decay, momentum=momentum)
    if name == "rmsprop":
        return torch.optim.RMSprop(parameters, lr=lr, weight_decay=weight_decay,
                                   momentum=momentum)
    raise UserError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """The multiplier of the base LR at optimiser step `step` (0-based): a linear warmup
    from 1/warmup_steps to 1, then cosine decay from 1 that would reach 0 one step after the
    last (so no step is spent at LR 0)."""
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise UserError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, epochs: int,
                   steps_per_epoch: int, warmup_epochs: float
                   ) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per batch, so the schedule is as smooth for 10 epochs as for 100."""
    total = epochs * steps_per_epoch
    warmup = min(total, round(warmup_epochs * steps_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, warmup, schedule))


class WeightAverage:
    """An exponential moving average of the weights and of BatchNorm's statistics, kept in a
    `torch.optim.swa_utils.AveragedModel`. The decay warms up as min(decay, (1+n)/(10+n)) for
    update n, so a short run's average is not dominated by the random initial weights.

    The update is two fused multi-tensor calls over lists built once, rather than
    AveragedModel.update_parameters, which rebuilds and regroups them in Python at every step
    (on a GPU that Python time, not the arithmetic, is the cost)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.current_decay = 0.0
        self.model = model
        self.averaged = AveragedModel(model, use_buffers=True)
        pairs = list(zip(itertools.chain(self.module.parameters(), self.module.buffers()),
                         itertools.chain(model.parameters(), model.buffers()), strict=True))
        # Integer buffers (BatchNorm's batch counter) are copied, not averaged.
        self._floats = ([a for a, _ in pairs if a.is_floating_point()],
                        [m for a, m in pairs if a.is_floating_point()])
        self._others = ([a for a, _ in pairs if not a.is_floating_point()],
                        [m for a, m in pairs if not a.is_floating_point()])

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        if model is not self.model and getattr(model, "module", None) is not self.model:
            # (or that model inside DistributedDataParallel, which holds it as .module)
            raise ValueError("WeightAverage follows the model it was made with")
        self.updates += 1
        self.current_decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        averaged, current = self._floats
        if self.updates == 1:  # the first update copies, as AveragedModel's does
            torch._foreach_copy_(averaged, current)
        else:
            torch._foreach_lerp_(averaged, current, 1.0 - self.current_decay)
        if self._others[0]:
            torch._foreach_copy_(*self._others)
        self.averaged.n_averaged += 1

    @property
    def module(self) -> nn.Module:
        return self.averaged.module


class NonFiniteLossError(UserError):
    """Training diverged."""


class Stepper:
    """One device's way of running batches: channels_last everywhere, AMP on CUDA.

    channels_last (NHWC) is what cuDNN's tensor cores and oneDNN's CPU convolutions are
    fastest in: on 2 CPU cores a DenseNet121 trains 1.21x (128 px) to 1.27x (224 px) faster
    than in PyTorch's default NCHW (bench/train_step.py). AMP is bfloat16 where the GPU has it
    (Ampere and later): it keeps float32's range, so it needs no GradScaler, whose overflow
    check reads a flag back from the GPU at every step. Older GPUs get float16 with the
    GradScaler. CPUs stay fp32."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        bf16 = self.cuda and torch.cuda.is_bf16_supported()
        self.amp_dtype = torch.bfloat16 if bf16 else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.cuda and not bf16)

    def prepare(self, model: nn.Module) -> nn.Module:
        return model.to(self.device, memory_format=torch.channels_last)

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        return images.contiguous(memory_format=torch.channels_last)

    def autocast(self):
        return torch.autocast("cuda", dtype=self.amp_dtype, enabled=self.cuda)


# On CUDA, how often (in steps) the loop reads the running loss back: each read is a host
# sync that stalls the GPU queue. On CPU there is nothing to stall, so it reads every step.
SYNC_EVERY = 25


DEFAULTS = TrainConfig()


@dataclass(frozen=True)
class Recipe:
    """How `fit` optimises, beyond the optimiser itself. The defaults are training's
    (TrainConfig), so `fit` called directly trains what the train command trains."""

    schedule: str = DEFAULTS.schedule
    warmup_epochs: float = DEFAULTS.warmup_epochs
    ema_decay: float = DEFAULTS.ema_decay
    label_smoothing: float = DEFAULTS.label_smoothing
    grad_clip: float = DEFAULTS.grad_clip
    class_weights: tuple[float, ...] | None = None  # of the training loss (balance=weights)

    @classmethod
    def of(cls, config: TrainConfig, train_labels: Sequence[int] = ()) -> Recipe:
        """The recipe a training config asks for (balance=weights: inverse class frequencies
        of `train_labels`, so every class carries the same total weight)."""
        weights = None
        if config.balance == "weights" and len(train_labels):
            counts = np.bincount(train_labels, minlength=config.num_classes)
            weights = tuple(float(len(train_labels) / (config.num_classes * max(count, 1)))
                            for count in counts)
        return cls(schedule=config.schedule, warmup_epochs=config.warmup_epochs,
                   ema_decay=config.ema_decay, label_smoothing=config.label_smoothing,
                   grad_clip=config.grad_clip, class_weights=weights)


class BestEpoch:
    """Which epoch's weights training keeps, and when it gives up.

    Better = higher val AUC, or the same AUC at a lower val loss (AUC saturates at 1.0 on easy
    data while calibration still improves). A NaN AUC (a val split missing a class) ranks
    below any AUC; the first epoch is always the starting reference. After `patience` epochs
    in a row without a better one, training stops."""

    def __init__(self, patience: int):
        self.patience = patience
        self.epoch = 0  # the best so far (0: none yet)
        self.val_auc = -math.inf
        self._score = (-math.inf, -math.inf)
        self.epochs_without_gain = 0

    def better(self, epoch: int, val_auc: float, val_loss: float) -> bool:
        """Record one epoch's validation; True when it is the new best."""
        score = (-math.inf if math.isnan(val_auc) else val_auc, -val_loss)
        if self.epoch == 0 or score > self._score:
            self.epoch, self.val_auc, self._score = epoch, val_auc, score
            self.epochs_without_gain = 0
            return True
        self.epochs_without_gain += 1
        return False

    @property
    def patience_spent(self) -> bool:
        return self.epochs_without_gain >= self.patience


@dataclass
class FitResult:
    history: list[dict[str, float]] = field(default_factory=list)  # one row per epoch
    best_epoch: int = 0
    best_val_auc: float = -math.inf
    stopped_early: bool = False


def fit(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    *,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    patience: int,
    device: torch.device,
    recipe: Recipe = Recipe(),
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    progress: bool = True,
    world: World = SOLO,
) -> FitResult:
    """Train for up to `epochs`, keep the weights of the best val AUC epoch, restore them.

    With `recipe.ema_decay` the weights validated, kept and restored are the moving average.
    Stops early after `patience` epochs without improvement. `on_epoch` gets each epoch's
    row (epoch, lr, train_/val_ loss, accuracy, auc, f1) and may raise to stop the run.

    In a `world` of several processes, `train_loader` draws this process's shard (a
    DistributedSampler, reseeded each epoch) and `val_loader` holds its `world.shard` of the
    val split, in order: the val answers are gathered, so the metrics cover every val film
    once and every process keeps the same epoch.
    """
    stepper = Stepper(device)
    model = stepper.prepare(model)
    trained = world.wrap(model, device)  # DistributedDataParallel under torchrun
    scheduler = make_scheduler(optimizer, recipe.schedule, epochs, len(train_loader),
                               recipe.warmup_epochs)
    average = WeightAverage(model, recipe.ema_decay) if recipe.ema_decay > 0 else None
    evaluated = average.module if average is not None else model
    result = FitResult()
    best = BestEpoch(patience)
    best_state = copy.deepcopy(evaluated.state_dict())

    for epoch in range(1, epochs + 1):
        if hasattr(train_loader.sampler, "set_epoch"):  # a new shuffle each epoch
            train_loader.sampler.set_epoch(epoch)
        bar = tqdm(train_loader, desc=f"epoch {epoch}/{epochs}", unit="batch",
                   disable=not progress, leave=False)
        row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"]}
        row |= _train_numbers(*train_one_epoch(
            trained, bar, optimizer, stepper, recipe.grad_clip, epoch, scheduler=scheduler,
            average=average, label_smoothing=recipe.label_smoothing,
            class_weights=recipe.class_weights, world=world), world)
        row |= _validated(evaluated, val_loader, device, world)
        result.history.append(row)

        if best.better(epoch, row["val_auc"], row["val_loss"]):
            best_state = copy.deepcopy(evaluated.state_dict())
        if progress:
            tqdm.write(f"epoch {epoch}: train loss {row['train_loss']:.4f} auc "
                       f"{row['train_auc']:.3f} | val loss {row['val_loss']:.4f} auc "
                       f"{row['val_auc']:.3f}")
        if on_epoch is not None:
            on_epoch(row)
        if best.patience_spent:
            result.stopped_early = True
            break

    result.best_epoch, result.best_val_auc = best.epoch, best.val_auc
    model.load_state_dict(best_state)  # the average has the model's own keys
    world.share_main_state(model)  # (equal already: shared before each validation)
    return result


def _train_numbers(loss: float, labels: np.ndarray, probabilities: np.ndarray,
                   world: World) -> dict[str, float]:
    """The epoch's train loss and metrics over every process's films (a DistributedSampler
    repeats up to nproc - 1 of them to give all processes as many: these may count those
    twice)."""
    loss_sum = world.gather(np.array([loss * len(labels)])).sum()
    labels, probabilities = world.gather(labels), world.gather(probabilities)
    return {"train_loss": float(loss_sum / len(labels))} | {
        f"train_{k}": v for k, v in epoch_metrics(labels, probabilities).items()}


def _validated(model: nn.Module, val_loader: DataLoader, device: torch.device,
               world: World) -> dict[str, float]:
    """The val split's loss and metrics, each val film once whatever the processes."""
    world.share_main_state(model)  # every shard scored by the model rank 0 keeps
    probabilities, labels, loss = predict(model, val_loader, device, with_loss=True)
    loss_sum = float(world.gather(np.array([loss * len(labels)])).sum())
    probabilities, labels = world.gather_shards(probabilities), world.gather_shards(labels)
    return {"val_loss": loss_sum / max(1, len(labels))} | {
        f"val_{k}": v for k, v in epoch_metrics(labels, probabilities).items()}


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    stepper: Stepper,
    grad_clip: float,
    epoch: int = 1,
    *,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    average: WeightAverage | None = None,
    label_smoothing: float = 0.0,
    class_weights: tuple[float, ...] | None = None,
    world: World = SOLO,
) -> tuple[float, np.ndarray, np.ndarray]:
    """One pass of optimisation; returns mean (smoothed, weighted) loss, labels and softmax
    outputs of this process's batches. `average` follows the bare network, also when `model`
    is it wrapped in DistributedDataParallel."""
    model.train()
    device = stepper.device
    weight = (torch.tensor(class_weights, dtype=torch.float32, device=device)
              if class_weights is not None else None)
    sync_every = SYNC_EVERY if stepper.cuda else 1
    loss_sum = torch.zeros((), device=device)
    labels, outputs = [], []
    for step, (images, targets) in enumerate(batches):
        targets = targets.to(device, non_blocking=True)
        with stepper.autocast():
            logits = model(stepper.inputs(images))
            loss = nn.functional.cross_entropy(logits.float(), targets, weight=weight,
                                               label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        stepper.scaler.scale(loss).backward()
        if grad_clip > 0:
            stepper.scaler.unscale_(optimizer)  # clip the true gradients, not AMP-scaled ones
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        stepper.scaler.step(optimizer)
        stepper.scaler.update()
        if scheduler is not None:
            scheduler.step()
        if average is not None:
            average.update(model)
        lifecycle.pause_point("epoch")
        # Kept on the device: no host sync here (see SYNC_EVERY).
        loss_sum += loss.detach() * len(targets)
        labels.append(targets)
        outputs.append(torch.softmax(logits.detach().float(), dim=1))
        if (step + 1) % sync_every == 0:
            _check_finite(loss, epoch, step, world)
            if hasattr(batches, "set_postfix"):  # a tqdm bar: show the running loss
                batches.set_postfix(loss=f"{loss.item():.4f}")
    _check_finite(loss_sum, epoch, step, world)
    all_labels = torch.cat(labels).cpu().numpy()
    return loss_sum.item() / len(all_labels), all_labels, torch.cat(outputs).cpu().numpy()


def _check_finite(loss: torch.Tensor, epoch: int, step: int, world: World = SOLO) -> None:
    """Stop on a non-finite loss: in every process at the same step, when any has one (the
    others would otherwise wait for it in their next gradient exchange)."""
    if not world.all_true(torch.isfinite(loss)):
        raise NonFiniteLossError(
            f"training loss became {loss.item()} at epoch {epoch} (by step {step + 1}"
            f"{f', in one of {world.size} processes' if world.grouped else ''}); "
            "lower lr or set grad_clip (e.g. 1.0)")


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device: torch.device,
            with_loss: bool = False):
    """Softmax probabilities and labels over `loader` in eval mode (+ mean loss if asked).

    In float32 even on CUDA, unlike training's AMP: the model is logged and tested in
    float32, so the val numbers that pick the best epoch are computed the same way."""
    stepper = Stepper(device)
    model.eval()
    probabilities, labels = [], []
    loss_sum = torch.zeros((), device=device)
    for images, targets in loader:
        logits = model(stepper.inputs(images)).float()
        targets = targets.to(device, non_blocking=True)
        loss_sum += nn.functional.cross_entropy(logits, targets, reduction="sum")
        probabilities.append(torch.softmax(logits, dim=1))
        labels.append(targets)
    probabilities_array = torch.cat(probabilities).cpu().numpy()
    labels_array = torch.cat(labels).cpu().numpy()
    if with_loss:
        return probabilities_array, labels_array, loss_sum.item() / max(len(labels_array), 1)
    return probabilities_array, labels_array
