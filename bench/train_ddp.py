"""Data-parallel training throughput: one process against `--nproc` processes started by
torchrun, each running our loop (train_one_epoch, default recipe) under
DistributedDataParallel on in-memory batches of `--batch-size` per process (so data loading
is out of the picture). Rounds alternate 1 / N processes so drift on a noisy machine hits both.

Images/s counts every process's images over the slowest process's time. On GPUs each
process gets one GPU (NCCL); on CPU (gloo) the cores are divided between the processes, as
`-P nproc` does, so the row says what splitting this machine's cores buys.

    python bench/train_ddp.py [--nproc 2] [--size 128] [--batch-size 16] [--steps 6] [--rounds 3]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import click
import numpy as np
import torch
from train_step import (  # this folder: scripts run as `python bench/...`
    images_per_second,
    recipe_epoch,
)

from covid_xray.model.networks import build, resolve_device
from covid_xray.training.distributed import joined
from covid_xray.training.loop import Stepper

MARK = "RESULT "


def timed_process(size: int, batch_size: int, steps: int) -> None:
    """One process under torchrun: warm up, then time `steps` training steps."""
    visible = resolve_device("auto")
    with joined(visible) as world:
        device = world.device(visible)
        torch.manual_seed(world.rank)
        batches = [(torch.randn(batch_size, 1, size, size) * 500,
                    torch.randint(0, 2, (batch_size,))) for _ in range(steps)]
        stepper = Stepper(device)
        model = world.wrap(stepper.prepare(build("none", 2)), device)
        epoch = recipe_epoch(model, batches, stepper, world)
        epoch()  # warm-up: allocator, cuDNN autotune, the gradient buckets
        own = images_per_second(epoch, batch_size * steps, device)
        slowest = world.gather(np.array([own])).min()  # all process as many images
        if world.main:
            print(MARK + json.dumps({"images_per_second": world.size * slowest}), flush=True)


def measure(nproc: int, size: int, batch_size: int, steps: int) -> float:
    cores = len(os.sched_getaffinity(0))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", __file__, "--worker", "--size", str(size),
               "--batch-size", str(batch_size), "--steps", str(steps)]
    env = os.environ | {"OMP_NUM_THREADS": str(max(1, cores // nproc))}
    output = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
    line = next(line for line in output.splitlines() if line.startswith(MARK))
    return json.loads(line.removeprefix(MARK))["images_per_second"]


@click.command()
@click.option("--nproc", default=2, show_default=True, help="Processes to compare with one "
              "(on GPUs: at most one per GPU).")
@click.option("--size", default=128, show_default=True)
@click.option("--batch-size", default=16, show_default=True, help="Per process.")
@click.option("--steps", default=6, show_default=True, help="Timed steps per round.")
@click.option("--rounds", default=3, show_default=True)
@click.option("--worker", is_flag=True, hidden=True)
def main(nproc: int, size: int, batch_size: int, steps: int, rounds: int, worker: bool) -> None:
    if worker:
        timed_process(size, batch_size, steps)
        return
    cuda = torch.cuda.is_available()
    where = (f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}" if cuda else
             f"CPU, {len(os.sched_getaffinity(0))} cores shared by the processes")
    print(f"DenseNet121, {size} px, batch {batch_size} per process, {steps} steps x {rounds} "
          f"rounds, {where}")
    rates = {1: 0.0, nproc: 0.0}
    for _ in range(rounds):
        for count in rates:
            rates[count] = max(rates[count], measure(count, size, batch_size, steps))
    print(f"1 process {rates[1]:.1f} img/s | {nproc} processes {rates[nproc]:.1f} img/s | "
          f"{nproc} / 1 {rates[nproc] / rates[1]:.2f}x")


if __name__ == "__main__":
    main()
