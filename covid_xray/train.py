"""The training loop: plain PyTorch, seeded, early stopping on val AUC, best weights restored.

It knows nothing of MLflow: each finished epoch is handed to an `on_epoch` callback, which the
caller uses to log (tracking.py) or to report to Optuna (tune.py).
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from covid_xray import lifecycle
from covid_xray.errors import UserError
from covid_xray.metrics import epoch_metrics


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA GPU is visible; use device=auto or cpu")
    return torch.device(name)


def make_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float = 0.0,
                   momentum: float = 0.9, amsgrad: bool = False) -> torch.optim.Optimizer:
    parameters = model.parameters()
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay, amsgrad=amsgrad)
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, weight_decay=weight_decay, momentum=momentum)
    if name == "rmsprop":
        return torch.optim.RMSprop(parameters, lr=lr, weight_decay=weight_decay,
                                   momentum=momentum)
    raise UserError(f"optimizer must be adam, sgd or rmsprop, got {name!r}")


class NonFiniteLossError(UserError):
    """Training diverged."""


class Stepper:
    """One device's way of running batches: AMP + channels_last on CUDA, plain fp32 on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.cuda)

    def prepare(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.cuda else model

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        return images.contiguous(memory_format=torch.channels_last) if self.cuda else images

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.float16, enabled=self.cuda)


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
    grad_clip: float = 1.0,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    progress: bool = True,
) -> FitResult:
    """Train for up to `epochs`, keep the weights of the best val AUC epoch, restore them.

    Stops early after `patience` epochs without improvement. `on_epoch` gets each epoch's
    row (epoch, train_/val_ loss, accuracy, auc, f1) and may raise to stop the run (pruning).
    """
    stepper = Stepper(device)
    model = stepper.prepare(model)
    result = FitResult()
    best_state = copy.deepcopy(model.state_dict())
    best_score = (-math.inf, -math.inf)
    epochs_without_gain = 0

    for epoch in range(1, epochs + 1):
        bar = tqdm(train_loader, desc=f"epoch {epoch}/{epochs}", unit="batch",
                   disable=not progress, leave=False)
        train_loss, train_labels, train_probabilities = train_one_epoch(
            model, bar, optimizer, stepper, grad_clip, epoch)
        row = {"epoch": epoch, "train_loss": train_loss}
        row |= {f"train_{k}": v for k, v in
                epoch_metrics(train_labels, train_probabilities).items()}
        val_probabilities, val_labels, val_loss = predict(model, val_loader, device,
                                                          with_loss=True)
        row["val_loss"] = val_loss
        row |= {f"val_{k}": v for k, v in epoch_metrics(val_labels, val_probabilities).items()}
        result.history.append(row)

        # Better = higher val AUC, or the same AUC at a lower val loss (AUC saturates at 1.0 on
        # easy data while calibration still improves). NaN (a val split missing a class)
        # ranks below any AUC; the first epoch is always the starting reference.
        val_auc = row["val_auc"]
        score = (-math.inf if math.isnan(val_auc) else val_auc, -val_loss)
        if result.best_epoch == 0 or score > best_score:
            result.best_epoch, result.best_val_auc, best_score = epoch, val_auc, score
            best_state = copy.deepcopy(model.state_dict())
            epochs_without_gain = 0
        else:
            epochs_without_gain += 1
        if progress:
            tqdm.write(f"epoch {epoch}: train loss {row['train_loss']:.4f} auc "
                       f"{row['train_auc']:.3f} | val loss {val_loss:.4f} auc {val_auc:.3f}")
        if on_epoch is not None:
            on_epoch(row)
        if epochs_without_gain >= patience:
            result.stopped_early = True
            break

    model.load_state_dict(best_state)
    return result


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    stepper: Stepper,
    grad_clip: float,
    epoch: int = 1,
) -> tuple[float, np.ndarray, np.ndarray]:
    """One pass of optimisation; returns mean loss, labels and softmax outputs seen."""
    model.train()
    loss_sum, labels, outputs = 0.0, [], []
    for step, (images, targets) in enumerate(batches):
        targets = targets.to(stepper.device, non_blocking=True)
        with stepper.autocast():
            logits = model(stepper.inputs(images))
            loss = nn.functional.cross_entropy(logits.float(), targets)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"training loss became {loss.item()} at epoch {epoch}, step {step + 1}; "
                "lower lr or set grad_clip (e.g. 1.0)")
        optimizer.zero_grad(set_to_none=True)
        stepper.scaler.scale(loss).backward()
        if grad_clip > 0:
            stepper.scaler.unscale_(optimizer)  # clip the true gradients, not AMP-scaled ones
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        stepper.scaler.step(optimizer)
        stepper.scaler.update()
        lifecycle.pause_point("epoch")
        loss_sum += loss.item() * len(targets)
        labels.append(targets.cpu())
        outputs.append(torch.softmax(logits.detach().float(), dim=1).cpu())
        if hasattr(batches, "set_postfix"):  # a tqdm bar: show the running loss
            batches.set_postfix(loss=f"{loss.item():.4f}")
    all_labels = torch.cat(labels).numpy()
    return loss_sum / len(all_labels), all_labels, torch.cat(outputs).numpy()


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device: torch.device,
            with_loss: bool = False):
    """Softmax probabilities and labels over `loader` in eval mode (+ mean loss if asked)."""
    stepper = Stepper(device)
    model.eval()
    probabilities, labels, loss_sum = [], [], 0.0
    for images, targets in loader:
        with stepper.autocast():
            logits = model(stepper.inputs(images)).float()
        targets = targets.to(device)
        loss_sum += nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        probabilities.append(torch.softmax(logits, dim=1).cpu())
        labels.append(targets.cpu())
    probabilities_array = torch.cat(probabilities).numpy()
    labels_array = torch.cat(labels).numpy()
    if with_loss:
        return probabilities_array, labels_array, loss_sum / max(len(labels_array), 1)
    return probabilities_array, labels_array
