"""The training recipe's parts with exact expectations: the LR schedule at known steps, the
weight average against a hand computation, label smoothing, test-time augmentation, and a
loop that reads the device once per epoch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from covid_xray.model.networks import Classifier
from covid_xray.training.loop import (
    Stepper,
    WeightAverage,
    lr_factor,
    make_optimizer,
    make_scheduler,
    train_one_epoch,
)


def test_cosine_schedule_at_known_steps():
    # 10 epochs of 10 steps, 1 epoch of warmup: 0.1, 0.2 ... 1.0, then cosine from 1 down
    # towards 0, which it would reach one step after the last: no step trains at LR 0.
    assert [lr_factor(step, 100, 10, "cosine") for step in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert lr_factor(10, 100, 10, "cosine") == 1.0
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)  # half way through the decay
    assert lr_factor(99, 100, 10, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert lr_factor(99, 100, 10, "cosine") > 0
    assert lr_factor(57, 100, 10, "constant") == 1.0
    # One step per epoch, two epochs: the second epoch still trains (it used to get LR 0).
    assert lr_factor(1, 2, 1, "cosine") == 1.0


def test_scheduler_sets_the_lr_every_step():
    model = nn.Linear(2, 2)
    optimizer = make_optimizer(model, "adamw", 1e-3, weight_decay=0.05)
    scheduler = make_scheduler(optimizer, "cosine", epochs=4, steps_per_epoch=5,
                               warmup_epochs=1.0)
    seen = []
    for _ in range(20):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [1e-3 * lr_factor(step, 20, 5, "cosine") for step in range(20)]
    np.testing.assert_allclose(seen, expected, rtol=1e-12)
    assert seen[:5] == pytest.approx([2e-4, 4e-4, 6e-4, 8e-4, 1e-3])


def test_adamw_decays_weights_decoupled_from_the_gradient():
    # With a zero gradient Adam's L2 term still moves the weight through the adaptive step,
    # while AdamW shrinks it by exactly lr * weight_decay.
    weight = nn.Parameter(torch.tensor([2.0]))
    optimizer = make_optimizer(nn.ParameterList([weight]), "adamw", 0.1, weight_decay=0.5)
    weight.grad = torch.zeros(1)
    optimizer.step()
    assert weight.item() == pytest.approx(2.0 * (1 - 0.1 * 0.5))


def test_weight_average_equals_a_hand_computation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    average = WeightAverage(model, decay=0.5)
    snapshots = []
    for _ in range(4):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter))
        model(torch.randn(8, 3))  # moves BatchNorm's running statistics (buffers)
        average.update(model)
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})

    # Update 1 copies; update n >= 2 blends with decay min(0.5, (1 + n) / (10 + n)).
    for key, value in average.module.state_dict().items():
        expected = snapshots[0][key].clone()
        if expected.is_floating_point():
            for n, snapshot in enumerate(snapshots[1:], start=2):
                decay = min(0.5, (1 + n) / (10 + n))
                expected = decay * expected + (1 - decay) * snapshot[key]
        else:  # BatchNorm's batch counter follows the model
            expected = snapshots[-1][key]
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-6, msg=key)
    assert average.current_decay == pytest.approx(5 / 14)


class Asymmetric(nn.Module):
    """Logits that depend on where the bright pixels are: (left half sum, right half sum)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.stack([x[..., :half].sum(dim=(1, 2, 3)), x[..., half:].sum(dim=(1, 2, 3))],
                           dim=1)


def test_flip_tta_averages_the_film_and_its_mirror():
    x = torch.zeros(1, 1, 4, 4)
    x[..., :2] = 1.0  # left half bright: logits (8, 0), mirrored (0, 8)
    plain = Classifier(Asymmetric(), ("negative", "opacity"))(x)
    assert plain[0, 0].item() == pytest.approx(1 / (1 + math.exp(-8)))
    averaged = Classifier(Asymmetric(), ("negative", "opacity"), tta="flip")(x)
    torch.testing.assert_close(averaged, torch.tensor([[0.5, 0.5]]))


def test_label_smoothing_reaches_the_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    batches = [(torch.randn(6, 1, 2, 2), torch.tensor([0, 1, 0, 1, 0, 1]))]
    losses = []
    for smoothing in (0.0, 0.2):
        copy = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
        copy.load_state_dict(model.state_dict())
        optimizer = make_optimizer(copy, "sgd", 0.0)
        loss, _, _ = train_one_epoch(copy, batches, optimizer, Stepper(torch.device("cpu")),
                                     grad_clip=0.0, label_smoothing=smoothing)
        losses.append(loss)
    logits = model(batches[0][0])
    for smoothing, loss in zip((0.0, 0.2), losses, strict=True):
        expected = nn.functional.cross_entropy(logits, batches[0][1], label_smoothing=smoothing)
        assert loss == pytest.approx(expected.item(), rel=1e-6)
