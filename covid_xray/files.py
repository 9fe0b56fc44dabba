"""Files shared safely between processes: writes readers never see half of, and one
process at a time on a new sqlite store. Every layer that writes files uses these, so they
sit below all of them, at the top level."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: Path, write: Callable[[BinaryIO], object],
                 durable: bool = False) -> None:
    """Write via a unique temporary file in the same folder, then rename it into place.
    `durable`: on disk before this returns (the file's bytes, then the folder's entry, each
    fsynced), for a write whose success is promised to someone else: a C-STORE answered
    "stored" must survive a power cut, or the ledger points at an empty file the PACS will
    not send again. (Not for caches: an fsync per file costs milliseconds.)"""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            if durable:
                file.flush()
                os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    if durable:
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


@contextlib.contextmanager
def sqlite_turn(url: str) -> Iterator[None]:
    """For a `sqlite:///` URL, one process at a time inside the block (a file lock beside the
    database, `<db>.init-lock`): MLflow and Optuna create and migrate a new sqlite store on
    first use, and two processes doing that at once collide ("duplicate column name").
    Other URLs: no lock."""
    if not url.startswith("sqlite:///"):
        yield
        return
    with open(Path(url.removeprefix("sqlite:///")).with_suffix(".init-lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
