"""Training throughput: our loop (train.train_one_epoch) against a bare PyTorch loop.

Same model (DenseNet121, 1 channel, random init), same batches (held in memory, so data
loading is out of the picture), same optimiser. Rounds alternate ours / bare so drift on a
noisy machine hits both; the ratio is ours / bare images per second (target >= 0.95).
On CUDA ours uses AMP + channels_last, so a second bare fp32 baseline is not comparable; the
script says which device it ran on.

    python bench/train_step.py [--sizes 128,224] [--batch-size 16] [--steps 6] [--rounds 3]
"""

from __future__ import annotations

import time

import click
import torch
from torch import nn

from covid_xray.model import build
from covid_xray.train import Stepper, make_optimizer, resolve_device, train_one_epoch


def bare_epoch(model: nn.Module, batches, optimizer, device: torch.device) -> None:
    model.train()
    for images, targets in batches:
        images, targets = images.to(device), targets.to(device)
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(images), targets)
        loss.backward()
        optimizer.step()


def images_per_second(run, count: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return count / (time.perf_counter() - start)


def compare(size: int, batch_size: int, steps: int, rounds: int,
            device: torch.device) -> tuple[float, float]:
    """Best-of-`rounds` images/s of (ours, bare) at `size` px."""
    torch.manual_seed(0)
    batches = [(torch.randn(batch_size, 1, size, size) * 500,
                torch.randint(0, 2, (batch_size,))) for _ in range(steps)]
    ours_model, bare_model = build("none", 2), build("none", 2)
    bare_model.load_state_dict(ours_model.state_dict())
    stepper = Stepper(device)
    ours_model = stepper.prepare(ours_model)
    bare_model = bare_model.to(device)
    ours_optimizer = make_optimizer(ours_model, "adam", 1e-4)
    bare_optimizer = make_optimizer(bare_model, "adam", 1e-4)

    def ours() -> None:
        train_one_epoch(ours_model, batches, ours_optimizer, stepper, grad_clip=1.0)

    def bare() -> None:
        bare_epoch(bare_model, batches, bare_optimizer, device)

    ours(), bare()  # warm-up: allocator, cuDNN autotune, first-touch
    count = batch_size * steps
    ours_rates, bare_rates = [], []
    for _ in range(rounds):
        ours_rates.append(images_per_second(ours, count, device))
        bare_rates.append(images_per_second(bare, count, device))
    return max(ours_rates), max(bare_rates)


@click.command()
@click.option("--sizes", default="128,224", show_default=True)
@click.option("--batch-size", default=16, show_default=True)
@click.option("--steps", default=6, show_default=True, help="Batches per timed epoch.")
@click.option("--rounds", default=3, show_default=True)
@click.option("--device", default="auto", show_default=True)
def main(sizes: str, batch_size: int, steps: int, rounds: int, device: str) -> None:
    torch_device = resolve_device(device)
    print(f"device {torch_device}, {torch.get_num_threads()} threads, DenseNet121, batch "
          f"{batch_size}, {steps} steps x {rounds} rounds per loop")
    for size in (int(s) for s in sizes.split(",")):
        ours, bare = compare(size, batch_size, steps, rounds, torch_device)
        print(f"{size:4d} px: ours {ours:7.1f} img/s | bare {bare:7.1f} img/s | "
              f"ratio {ours / bare:.3f}")


if __name__ == "__main__":
    main()
