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


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write via a unique temporary file in the same folder, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


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
