"""Data-parallel training over several processes, started by torchrun: who this process is,
and the few collective steps training needs.

`torchrun --nproc_per_node=N -m entrypoints.train ...` (or `-P nproc=N`, which starts
torchrun's launcher itself: `launch`) runs the same training command N times. Each process
learns its rank from the environment torchrun sets (`World.join`), trains on its shard of the
training split under DistributedDataParallel, and scores its share of the val and test films;
the scores are gathered so every process computes the same metrics on every study once, and
so takes the same early-stopping decisions. Rank 0 alone builds the image cache (the others
wait), and alone talks to MLflow: one run, one registered version.

A plain `python -m entrypoints.train` is a world of one (`SOLO`): the same code path, with
no process group and no collective calls.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
import signal
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from covid_xray import lifecycle
from covid_xray.cli import USER_ERROR_EXIT
from covid_xray.errors import UserError, first_line

T = TypeVar("T")

# How long a collective may wait. The longest wait is the others' while rank 0 builds the
# image cache (hours, for a whole archive); a rank that dies is noticed by torchrun, which
# stops the others, so this is not how failures are found.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=12)


def launched_by_torchrun() -> bool:
    """torchrun (or any launcher speaking its protocol) set this process's rank."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


@dataclass(frozen=True)
class World:
    """This process's place among those training together."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0  # on this machine: which GPU is ours
    grouped: bool = False  # a process group exists (started by torchrun, even of one)

    @property
    def main(self) -> bool:
        """Rank 0: the one that builds the cache, logs, registers and prints."""
        return self.rank == 0

    @classmethod
    def join(cls, device: torch.device) -> World:
        """Join the process group torchrun's environment describes (NCCL on GPUs, gloo on
        CPU); a world of one when not started by torchrun."""
        if not launched_by_torchrun():
            return SOLO
        world = cls(rank=int(os.environ["RANK"]), size=int(os.environ["WORLD_SIZE"]),
                    local_rank=int(os.environ.get("LOCAL_RANK", "0")), grouped=True)
        backend = "nccl" if device.type == "cuda" else "gloo"
        # (Each process picks its GPU in `device`, before its first collective.)
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
        if not world.main:
            # Only rank 0 talks to MLflow: the others must not end (or resume) the run that
            # `mlflow run` made, and their prints would repeat rank 0's.
            os.environ.pop("MLFLOW_RUN_ID", None)
            lifecycle.forget_started_run()
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
        return world

    def device(self, device: torch.device) -> torch.device:
        """Each process on a machine gets its own GPU (LOCAL_RANK)."""
        if device.type != "cuda" or not self.grouped:
            return device
        if self.local_rank >= torch.cuda.device_count():
            raise UserError(f"process {self.rank} needs GPU {self.local_rank} but "
                            f"{torch.cuda.device_count()} are visible; start at most one "
                            "process per GPU (nproc)")
        torch.cuda.set_device(self.local_rank)
        return torch.device("cuda", self.local_rank)

    def leave(self) -> None:
        if self.grouped and dist.is_initialized():
            dist.destroy_process_group()

    def main_first(self, work: Callable[[], T]) -> T:
        """Run `work` on rank 0 while the others wait, then on the others: what rank 0
        downloads and caches, they find. When rank 0 fails with a user error, the others
        stop too, quietly (rank 0 has said why)."""
        if not self.grouped:
            return work()
        if self.main:
            try:
                value = work()
            except UserError as error:
                dist.broadcast_object_list([str(error)], src=0)
                raise
            dist.broadcast_object_list([None], src=0)
            return value
        outcome: list[str | None] = [None]
        dist.broadcast_object_list(outcome, src=0)
        if outcome[0] is not None:
            sys.exit(USER_ERROR_EXIT)
        return work()

    def check_same(self, value: str, what: str, remedy: str) -> None:
        """Stop every process, saying so, unless all hold the same `value`."""
        if not self.grouped:
            return
        values: list[str | None] = [None] * self.size
        dist.all_gather_object(values, value)
        differing = [rank for rank, other in enumerate(values) if other != values[0]]
        if differing:
            raise UserError(f"process {differing[0]} of {self.size} sees other {what} than "
                            f"process 0; {remedy}")

    def shard(self, count: int) -> range:
        """This process's share of `count` items to score: every size-th one from its rank,
        so shards differ in length by at most one and nothing is repeated."""
        return range(self.rank, count, self.size)

    def gather_shards(self, part: np.ndarray) -> np.ndarray:
        """Every process's `part` (rows for its `shard`) put back in item order, on every
        process."""
        if not self.grouped:
            return part
        parts: list[np.ndarray | None] = [None] * self.size
        dist.all_gather_object(parts, part)
        whole = np.empty((sum(len(p) for p in parts), *part.shape[1:]), dtype=part.dtype)
        for rank, rows in enumerate(parts):
            whole[rank::self.size] = rows
        return whole

    def gather(self, part: np.ndarray) -> np.ndarray:
        """Every process's `part`, concatenated in rank order, on every process."""
        if not self.grouped:
            return part
        parts: list[np.ndarray | None] = [None] * self.size
        dist.all_gather_object(parts, part)
        return np.concatenate(parts)

    def all_true(self, flag: torch.Tensor) -> bool:
        """True when `flag` (a bool tensor on this process's device) is true everywhere."""
        if not self.grouped:
            return bool(flag)
        value = flag.to(torch.int32)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return bool(value)

    def share_main_state(self, module: nn.Module) -> None:
        """Make `module` rank 0's on every process: its weights and buffers (BatchNorm's
        running statistics) broadcast in place. DistributedDataParallel keeps the trained
        weights equal, but each process updates its own statistics and its own weight
        average: without this, each process would score its shard with another model than
        the one rank 0 registers."""
        if not self.grouped:
            return
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)

    def wrap(self, network: nn.Module, device: torch.device) -> nn.Module:
        """The network as trained: under DistributedDataParallel when in a process group
        (gradients averaged over the processes at every step), else itself."""
        if not self.grouped:
            return network
        return nn.parallel.DistributedDataParallel(
            network, device_ids=[device.index] if device.type == "cuda" else None)


SOLO = World()


@contextlib.contextmanager
def joined(device: torch.device) -> Iterator[World]:
    """`World.join` for the length of a block; the group is left however the block ends.

    A process of the group that dies (killed, out of memory, its machine gone) leaves the
    others failing in their next collective with a backend traceback of 40 lines that says
    nothing of use: here that is one line, naming this process, and the dead one's own
    output says why it stopped."""
    world = World.join(device)
    try:
        yield world
    except RuntimeError as error:
        if not (world.grouped and lost_a_process(error)):
            raise
        raise UserError(f"process {world.rank} of {world.size}: another training process "
                        f"stopped ({_without_source(first_line(error))[:160]}); its own "
                        "output says why, "
                        "and every process stops") from None
    finally:
        world.leave()  # (a group with a dead member is left at once, and the exit is clean)


# What the backends say when a peer is gone (gloo: the TCP pair; NCCL: its own error type).
LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
             "Socket Timeout", "Timed out", "NCCL communicator was aborted")


def lost_a_process(error: BaseException) -> bool:
    """Whether `error` from a collective means a process of the group is gone."""
    return isinstance(error, dist.DistError) or any(marker in str(error) for marker in
                                                    LOST_PEER)


def _without_source(text: str) -> str:
    """A backend message without its source location ('[.../pair.cc:561] ')."""
    return re.sub(r"^\[[^\]]*\]\s*", "", text)


def project_root() -> Path:
    """The checkout whose `entrypoints/` the launched processes run."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "entrypoints" / "train.py").is_file():
        raise UserError(f"nproc > 1 runs `python -m entrypoints.train` from the project "
                        f"folder, and {root} has no entrypoints/train.py; run from a checkout")
    return root


def launch(nproc: int, arguments: list[str], device: torch.device) -> None:
    """Run `python -m entrypoints.train <arguments>` as `nproc` processes on this machine
    with torchrun's own launcher (`torchrun --standalone --nproc_per_node=nproc`), and wait.

    A process that fails with a user error has printed its one line: the launcher adds
    nothing and exits 2. A stop signal here is passed to every process (each ends as a
    stopped training does) and comes back out as a stop."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if device.type == "cuda" and nproc > torch.cuda.device_count():
        raise UserError(f"nproc={nproc} needs a GPU per process and "
                        f"{torch.cuda.device_count()} are visible; use nproc="
                        f"{torch.cuda.device_count()} (or device=cpu)")
    root = project_root()
    # The launcher logs each failure with its own prefix; the failing process has said why.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    if nproc > 1 and "OMP_NUM_THREADS" not in os.environ:
        # torchrun's rule would give each process one thread; on a CPU-only machine the
        # processes are what share the cores, so each gets its part of them.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1)
        os.environ["OMP_NUM_THREADS"] = str(max(1, cores // nproc))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(root), *filter(None, [os.environ.get("PYTHONPATH")])])
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc,
                          run_id=str(uuid.uuid4()), rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.5)
    print(f"training in {nproc} processes (torchrun, "
          f"{'nccl' if device.type == 'cuda' else 'gloo'})", flush=True)
    # Run from the user's folder (PYTHONPATH finds `entrypoints`): relative data_dir,
    # cache_dir and the default sqlite:///mlflow.db mean what they mean without nproc.
    try:
        elastic_launch(config, sys.executable)("-m", "entrypoints.train", *arguments)
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()  # the cause; the others were stopped
        if failure.exitcode == USER_ERROR_EXIT:
            sys.exit(USER_ERROR_EXIT)
        raise UserError(f"training process {rank} of {nproc} failed (exit code "
                        f"{failure.exitcode}); its output is above") from None
    except SignalException as stop:
        lifecycle.record_stop(int(stop.sigval))
        raise KeyboardInterrupt(f"signal {signal.Signals(stop.sigval).name}") from None
