"""DICOM files -> model inputs, decoded in parallel worker processes and handed out in order.

Decoding (JPEG 2000, JPEG-LS, 16-bit rescaling, resizing), not the network, bounds prediction
on a CPU: one process decoding files one after another left every other core idle. A
DataLoader over the files spreads them over `num_workers` processes and keeps decoding the
next batches while the model runs on this one.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
from torch.utils.data import DataLoader, Dataset

from covid_xray.errors import DicomError
from covid_xray.imaging.decoders import available_cores, decode_on_one_thread
from covid_xray.imaging.dicom import error_line
from covid_xray.imaging.preprocess import Preprocessing


@dataclass
class Decoded:
    """One input file, decoded or refused: what its output row needs besides the answer."""

    model_input: np.ndarray | None  # None when refused or unreadable
    error: str = ""  # one line naming the file ("" when read)
    reason: str = ""  # the stable code of a refusal (imaging/gate.py; "" when read)
    uids: dict[str, str] = field(default_factory=dict)  # dicom.UID_FIELDS of the film
    flags: tuple[str, ...] = ()  # the gate's notes on a film it let through


def decode(preprocessing: Preprocessing, source: Any) -> Decoded:
    """One model input, or the one-line error and reason code of a file that cannot be read
    or that the gate refuses.

    Never raises for one file's sake: whatever goes wrong with it is its row's error, so the
    other files of a folder or a request keep their answers."""
    try:
        if isinstance(source, DicomError):
            raise source  # found while opening the input: reported like the rest
        model_input, uids, flags = preprocessing.read(source)
        return Decoded(model_input, uids=uids, flags=flags)
    except Exception as error:
        return Decoded(None, error_line(getattr(source, "name", source), error),
                       getattr(error, "reason", "unreadable"), getattr(error, "uids", {}))


class DicomFiles(Dataset):
    def __init__(self, paths: Sequence[str], preprocessing: Preprocessing):
        self.paths = list(paths)
        self.preprocessing = preprocessing

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Decoded:
        return decode(self.preprocessing, self.paths[index])


def worker_count(num_workers: int, num_files: int) -> int:
    """How many decoding workers a folder of `num_files` gets: `num_workers` < 0 means one per
    available core, never more than files, and none for a single file."""
    if num_workers < 0:
        num_workers = available_cores()
    return min(num_workers, num_files) if num_files > 1 else 0


def start_workers_early(num_workers: int, num_files: int) -> None:
    """Start the server that workers are forked from now, in the background.

    Its start-up is mostly importing torch (~1.3 s on 2 cores). Started before the model
    loads, it overlaps that load instead of delaying the first batch."""
    if worker_count(num_workers, num_files):
        worker_context()
        multiprocessing.forkserver.ensure_running()


def worker_context() -> multiprocessing.context.BaseContext:
    """Workers forked from a fresh single-threaded server that has imported this module once:
    the context of every DataLoader with workers (prediction's and training's).

    Not plain fork: a worker forked from this process inherits locks held by its threads
    (MLflow's system metrics and logging, OpenCV's) and can wait on them forever. Not spawn:
    each worker would import torch anew, seconds each, which a folder of a few hundred films
    never earns back."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def _unchanged(item: Decoded) -> Decoded:
    return item  # not torch's default: it would turn arrays into tensors (None stays None)


def one_thread_per_worker(worker_id: int = 0) -> None:
    """Each worker works on one file at a time: OpenCV's and OpenJPEG's own threads in every
    worker would oversubscribe the cores that the workers already fill."""
    cv2.setNumThreads(1)
    decode_on_one_thread()


def decoded_batches(paths: Sequence[str], preprocessing: Preprocessing, batch_size: int,
                    num_workers: int) -> Iterator[list[Decoded]]:
    """The decoded files of consecutive `batch_size` slices of `paths`, in order.

    Workers take one file at a time (not one batch each: a folder of five batches would keep
    five cores busy however many there are) and the batches are put together here.
    `num_workers` < 0 means one worker per available core; 0 decodes in this process."""
    num_workers = worker_count(num_workers, len(paths))
    loader = DataLoader(DicomFiles(paths, preprocessing), batch_size=None,
                        collate_fn=_unchanged, num_workers=num_workers,
                        prefetch_factor=4 if num_workers else None,
                        multiprocessing_context=worker_context() if num_workers else None,
                        worker_init_fn=one_thread_per_worker if num_workers else None)
    batch: list[Decoded] = []
    for decoded in loader:
        batch.append(decoded)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch
