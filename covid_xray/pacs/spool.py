"""Received films on disk until their results are confirmed: `state_dir/spool/<study>/<sop>.dcm`,
named by digests of the UIDs (a UID is the sender's text: it names no file of ours).

The spool never fills the disk: past its size cap, or where a write would leave less free
space than the floor, it takes nothing and the listener answers "out of resources" (0xA700),
which a PACS retries later.
"""

from __future__ import annotations

import hashlib
import shutil
import threading
from pathlib import Path

from covid_xray.files import atomic_write

GB = 1e9
INSTANCE_LOCKS = 64


def file_key(uid: str) -> str:
    """A file name for a UID: 32 hex digits of its sha256."""
    return hashlib.sha256(uid.encode()).hexdigest()[:32]


class Spool:
    def __init__(self, folder: Path, max_gb: float, min_free_gb: float):
        self.folder = folder.resolve()  # the ledger's paths stay true from any working folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_bytes, self.min_free_bytes = max_gb * GB, min_free_gb * GB
        self.lock = threading.Lock()
        # Locks by instance, striped: bounded however many instances pass in a year.
        self.instance_locks = [threading.Lock() for _ in range(INSTANCE_LOCKS)]
        self.size = sum(path.stat().st_size for path in self.folder.rglob("*.dcm"))

    def instance_lock(self, study: str, sop: str) -> threading.Lock:
        """The lock of one instance's spool file (shared with a few others by hash)."""
        return self.instance_locks[hash((study, sop)) % INSTANCE_LOCKS]

    def no_room(self, size: int) -> str:
        """Why `size` more bytes cannot be taken ("" when they can)."""
        if self.size + size > self.max_bytes:
            return f"the spool holds {self.size / GB:.2f} GB of its {self.max_bytes / GB:g} GB"
        return self.low_disk(size)

    def low_disk(self, size: int = 0) -> str:
        """Why writing `size` more bytes to this disk would break its free floor ("" when it
        would not): every write the node makes (films, results) keeps to it."""
        free = shutil.disk_usage(self.folder).free
        if free - size < self.min_free_bytes:
            return (f"{free / GB:.2f} GB free on the state_dir's disk, the floor is "
                    f"{self.min_free_bytes / GB:g} GB")
        return ""

    def path(self, study: str, sop: str) -> Path:
        return self.folder / file_key(study) / f"{file_key(sop)}.dcm"

    def write(self, study: str, sop: str, data: bytes) -> Path | str:
        """The file written (whole or not at all), or why there was no room for it."""
        with self.lock:
            why = self.no_room(len(data))
            if why:
                return why
            path = self.path(study, sop)
            previous = path.stat().st_size if path.exists() else 0
            atomic_write(path, lambda file: file.write(data), durable=True)
            self.size += len(data) - previous
            return path

    def delete_unchanged(self, files: dict[str, str]) -> list[str]:
        """Delete the files (path -> the sha256 the ledger has of its bytes) that still hold
        those bytes, and their study's folder once empty; one written anew meanwhile (a film
        sent again with new pixels, whose ledger row is on its way) is kept. Under the spool's
        lock, which every write takes, so no film changes between the check and the delete.
        A path of '' (a file forgotten before) is skipped. The paths deleted (or gone)."""
        deleted = []
        with self.lock:
            for name, digest in files.items():
                if not name:
                    continue
                path = Path(name)
                if path.exists():
                    if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
                        continue
                    self.size -= path.stat().st_size
                    path.unlink()
                if path.parent.exists() and not any(path.parent.iterdir()):
                    path.parent.rmdir()
                deleted.append(name)
        return deleted

    def reconcile(self, kept: set[str]) -> int:
        """Delete the spool files the ledger does not name (`kept`: the paths it does): a
        crash between the ledger's move and the delete, or in the middle of a write (its
        temporary file), left them, counted for ever. Before the listener starts. How many."""
        orphans = [path for path in self.folder.rglob("*")
                   if path.is_file() and str(path) not in kept]
        for path in orphans:
            path.unlink()
        for folder in self.folder.iterdir():
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        self.size = sum(path.stat().st_size for path in self.folder.rglob("*.dcm"))
        return len(orphans)
