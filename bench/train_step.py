"""Training throughput: our loop (train.train_one_epoch, with the default recipe: AdamW, the
per-step cosine schedule, the weight average, label smoothing, gradient clipping, outputs kept
for the epoch's metrics) against a bare PyTorch loop (AdamW, nothing else).

Same model (DenseNet121, 1 channel, random init), same batches (held in memory, so data
loading is out of the picture). Rounds alternate ours / bare so drift on a noisy machine hits
both. Two ratios of images per second: ours / bare is what the recipe costs (the weight
average and clipping touch every parameter each step); ours plain / bare runs our loop with the
recipe off (constant LR, no average, no clipping, no smoothing), the same work as the bare
loop: that is the loop's own overhead (target >= 0.97 on CPU). Ours runs channels_last (and
AMP on CUDA), so the ratios compare it with a bare loop doing the same: "bare NHWC" on CPU,
"bare AMP" on CUDA. "bare" is the textbook NCHW fp32 loop, which shows what the layout gains.

    python bench/train_step.py [--sizes 128,224] [--batch-size 16] [--steps 6] [--rounds 3]
"""

from __future__ import annotations

import time
from collections.abc import Callable

import click
import torch
from torch import nn

from covid_xray.config import TrainConfig
from covid_xray.model.networks import build, resolve_device
from covid_xray.training.distributed import SOLO, World
from covid_xray.training.loop import (
    Stepper,
    WeightAverage,
    make_optimizer,
    make_scheduler,
    train_one_epoch,
)

DEFAULTS = TrainConfig()


def bare_epoch(model: nn.Module, batches, optimizer, device: torch.device,
               amp_dtype: torch.dtype | None = None, channels_last: bool = False) -> None:
    """The textbook loop; `channels_last` feeds NHWC images (to a model converted alike);
    with `amp_dtype`, under autocast (a GradScaler for float16 only)."""
    model.train()
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    for images, targets in batches:
        images, targets = images.to(device, non_blocking=True), targets.to(device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        optimizer.zero_grad()
        with torch.autocast("cuda", dtype=amp_dtype or torch.float16,
                            enabled=amp_dtype is not None):
            loss = nn.functional.cross_entropy(model(images), targets)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()


def images_per_second(run, count: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return count / (time.perf_counter() - start)


def recipe_epoch(model: nn.Module, batches, stepper: Stepper,
                 world: World = SOLO) -> Callable[[], None]:
    """One epoch of our loop with the default recipe over `batches`, as a call (`model` may
    be a network inside DistributedDataParallel: the optimiser and the average follow the
    network)."""
    network = getattr(model, "module", model)
    optimizer = make_optimizer(network, DEFAULTS.optimizer, DEFAULTS.lr, DEFAULTS.weight_decay)
    scheduler = make_scheduler(optimizer, DEFAULTS.schedule, 10_000, len(batches),
                               DEFAULTS.warmup_epochs)
    average = WeightAverage(network, DEFAULTS.ema_decay)
    return lambda: train_one_epoch(model, batches, optimizer, stepper, DEFAULTS.grad_clip,
                                   scheduler=scheduler, average=average,
                                   label_smoothing=DEFAULTS.label_smoothing, world=world)


def compare(size: int, batch_size: int, steps: int, rounds: int,
            device: torch.device) -> dict[str, float]:
    """Best-of-`rounds` images/s of each loop at `size` px."""
    torch.manual_seed(0)
    batches = [(torch.randn(batch_size, 1, size, size) * 500,
                torch.randint(0, 2, (batch_size,))) for _ in range(steps)]
    reference = build("none", 2)
    cuda = device.type == "cuda"
    stepper = Stepper(device)
    ours_model = stepper.prepare(build("none", 2))
    ours_model.load_state_dict(reference.state_dict())
    ours = recipe_epoch(ours_model, batches, stepper)

    plain_model = stepper.prepare(build("none", 2))
    plain_model.load_state_dict(reference.state_dict())
    plain_optimizer = make_optimizer(plain_model, "adamw", DEFAULTS.lr, DEFAULTS.weight_decay)

    def ours_plain() -> None:  # the loop alone: the bare loop's work, nothing of the recipe
        train_one_epoch(plain_model, batches, plain_optimizer, stepper, grad_clip=0.0)

    loops = {"ours": ours, "ours plain": ours_plain}
    bare_kinds = {"bare": (None, False)}  # name: (AMP dtype, channels_last)
    bare_kinds.update({"bare AMP": (stepper.amp_dtype, True)} if cuda else
                      {"bare NHWC": (None, True)})
    for name, (amp_dtype, channels_last) in bare_kinds.items():
        model = build("none", 2)
        model.load_state_dict(reference.state_dict())
        model = model.to(device, memory_format=torch.channels_last if channels_last
                         else torch.contiguous_format)
        optimizer = make_optimizer(model, "adamw", DEFAULTS.lr, DEFAULTS.weight_decay)
        loops[name] = (lambda model=model, optimizer=optimizer, amp_dtype=amp_dtype,
                       channels_last=channels_last:
                       bare_epoch(model, batches, optimizer, device, amp_dtype, channels_last))

    for loop in loops.values():
        loop()  # warm-up: allocator, cuDNN autotune, first-touch
    rates: dict[str, float] = dict.fromkeys(loops, 0.0)
    for _ in range(rounds):
        for name, loop in loops.items():
            rates[name] = max(rates[name], images_per_second(loop, batch_size * steps, device))
    return rates


@click.command()
@click.option("--sizes", default="128,224", show_default=True)
@click.option("--batch-size", default=16, show_default=True)
@click.option("--steps", default=6, show_default=True, help="Batches per timed epoch.")
@click.option("--rounds", default=3, show_default=True)
@click.option("--device", default="auto", show_default=True)
def main(sizes: str, batch_size: int, steps: int, rounds: int, device: str) -> None:
    torch_device = resolve_device(device)
    name = torch.cuda.get_device_name() if torch_device.type == "cuda" else "CPU"
    amp = f", AMP {Stepper(torch_device).amp_dtype}" if torch_device.type == "cuda" else ""
    print(f"device {torch_device} ({name}{amp}), {torch.get_num_threads()} threads, "
          f"DenseNet121, batch {batch_size}, {steps} steps x {rounds} rounds per loop")
    for size in (int(s) for s in sizes.split(",")):
        rates = compare(size, batch_size, steps, rounds, torch_device)
        reference = "bare AMP" if "bare AMP" in rates else "bare NHWC"  # ours' own layout
        print(f"{size:4d} px: " + " | ".join(f"{loop} {rate:7.1f} img/s"
                                             for loop, rate in rates.items())
              + f" | ours / {reference} {rates['ours'] / rates[reference]:.3f}"
              + f" | ours plain / {reference} {rates['ours plain'] / rates[reference]:.3f}")


if __name__ == "__main__":
    main()
