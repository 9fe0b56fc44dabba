"""Decode once: a store of preprocessed squares keyed by file content and parameters.

Layout: `<cache_dir>/<params>/<digest[:2]>/<digest>.npy`, where `<params>` reads like
`size128-voi1-v1` and `<digest>` is the BLAKE2 hash of the DICOM's bytes. Renaming or copying
a dataset therefore reuses its entries; editing a file or changing a parameter does not.

Every write goes to a unique temporary file in the destination folder and is then renamed
over the final name (atomic on POSIX), so an interrupted build never leaves a partial entry,
and two processes filling one cache at once at worst both write the same bytes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from covid_xray import lifecycle
from covid_xray.errors import DicomError, UserError
from covid_xray.files import atomic_write
from covid_xray.imaging.decoders import decode_on_one_thread
from covid_xray.imaging.dicom import HEADER_FIELDS, error_line, read_header
from covid_xray.imaging.preprocess import load_square
from covid_xray.pseudonyms import key_fingerprint, patient_pseudonym, pseudonym_key

# What the header memo holds per file: the header fields but the PatientID, and its pseudonym.
MEMO_FIELDS = (*(name for name in HEADER_FIELDS if name != "PatientID"), "patient")
# The header memo's folder (one per pseudonym key); renamed when what it holds changes, so
# old memos are read afresh (v2 held raw PatientIDs; v3 named placeholders like patients).
HEADER_MEMO = "headers-v4"
# Bump when load_square's output changes for the same input, so old entries are not served.
FORMAT_VERSION = 1


@dataclass(frozen=True)
class CacheParams:
    """Everything that changes the cached pixels."""

    img_size: int
    apply_voi_lut: bool = True

    @property
    def folder_name(self) -> str:
        return f"size{self.img_size}-voi{int(self.apply_voi_lut)}-v{FORMAT_VERSION}"


@dataclass
class BuildStats:
    decoded: int = 0  # files decoded by this build
    reused: int = 0  # files already in the cache
    unreadable: dict[str, str] = field(default_factory=dict)  # path -> why it failed


class ImageCache:
    """Preprocessed uint16 squares for one set of `CacheParams`."""

    def __init__(self, cache_dir: str | os.PathLike, params: CacheParams):
        self.root = Path(cache_dir)
        self.params = params
        self.folder = self.root / params.folder_name

    def entry_path(self, dicom_path: str | os.PathLike) -> Path:
        digest = self.content_digest(dicom_path)
        return self.folder / digest[:2] / f"{digest}.npy"

    def content_digest(self, dicom_path: str | os.PathLike) -> str:
        """BLAKE2 of the file's bytes (remembered)."""
        return self._remembered("digests", Path(dicom_path), _file_digest)

    def headers(self, dicom_paths: Sequence[str | os.PathLike], progress: bool = True
                ) -> tuple[list[dict[str, str]], int]:
        """Each file's `dicom.HEADER_FIELDS` (sex, age, view, manufacturer, body part) and
        `patient`, the keyed pseudonym of its PatientID (the raw one is not kept, here or in
        the memo: teams share a cache), read from its header only (a few KB, not the pixels)
        and remembered like the content digests, so a 6,000-study set is read once; and how
        many headers could not be read. The key is read first (`pseudonyms.pseudonym_key`):
        a bad one stops the run before any file is read.

        A failed read gives empty fields (that study is its own patient this time) and is not
        remembered: one transient I/O error must not make a study its own patient for good.
        The next run reads it again."""
        found, failures = [], 0
        with self.writing():
            key = pseudonym_key(self.root)
            memo = f"{HEADER_MEMO}-{key_fingerprint(key)}"
            for path in tqdm(dicom_paths, desc="reading headers", disable=not progress,
                             leave=False):
                try:
                    found.append(json.loads(self._remembered(
                        memo, Path(path), lambda source: _header_json(source, key))))
                except DicomError:
                    found.append(dict.fromkeys(MEMO_FIELDS, ""))
                    failures += 1
        return found, failures

    def patients(self, dicom_paths: Sequence[str | os.PathLike],
                 progress: bool = True) -> tuple[list[str], int]:
        """Each file's patient pseudonym ("" when unreadable or none, see `headers`) and the
        failure count."""
        found, failures = self.headers(dicom_paths, progress)
        return [fields["patient"] for fields in found], failures

    def build(
        self, dicom_paths: Sequence[str | os.PathLike], num_workers: int = 0,
        progress: bool = True,
    ) -> tuple[list[Path], BuildStats]:
        """Make sure every file has an entry; return the entry paths (same order) and counts.

        Files that fail to decode do not stop the others: they come back in
        `stats.unreadable` (path -> reason), are listed in `<cache_dir>/unreadable.txt`, and the
        caller decides whether that stops the run. Everything decoded stays cached.
        """
        with self.writing():
            entries = [self.entry_path(path) for path in tqdm(
                dicom_paths, desc="hashing DICOMs", disable=not progress, leave=False)]
            todo = [(str(path), str(entry)) for path, entry in
                    zip(dicom_paths, entries, strict=True) if not entry.exists()]
            stats = BuildStats(decoded=len(todo), reused=len(entries) - len(todo))
            bar = tqdm(total=len(todo), desc=f"caching {self.params.folder_name}", unit="img",
                       disable=not progress or not todo)
            if num_workers > 0 and len(todo) > 1:
                # spawn, not fork: the parent may hold torch/CUDA threads that do not survive.
                context = multiprocessing.get_context("spawn")
                with context.Pool(min(num_workers, len(todo)),
                                  initializer=decode_on_one_thread) as pool:
                    for source, error in pool.imap_unordered(_build_entry_star,
                                                             self._jobs(todo), chunksize=4):
                        stats.unreadable |= {source: error} if error else {}
                        bar.update()
                        lifecycle.pause_point("cache")
            else:
                for job in self._jobs(todo):
                    source, error = _build_entry_star(job)
                    stats.unreadable |= {source: error} if error else {}
                    bar.update()
                    lifecycle.pause_point("cache")
            bar.close()
            if stats.unreadable:
                listing = "".join(f"{path}\t{reason}\n" for path, reason in
                                  sorted(stats.unreadable.items()))
                atomic_write(self.unreadable_list, lambda file: file.write(listing.encode()))
        return entries, stats

    @property
    def unreadable_list(self) -> Path:
        """Where the last build listed the files it could not read (path, tab, reason)."""
        return self.root / "unreadable.txt"

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """A cache folder that cannot be written (read-only, another user's, a full disk) is
        the user's to fix: one line naming it, not a traceback. atomic_write has already
        removed its temporary file, so nothing partial stays behind."""
        try:
            yield
        except OSError as error:
            if error.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC,
                                   errno.EDQUOT):
                raise
            raise UserError(f"cannot write the image cache in {self.root} ({error.strerror}: "
                            f"{error.filename or self.root}); set cache_dir to a writable "
                            "folder with free space") from None

    def _jobs(self, todo: list[tuple[str, str]]) -> list[tuple[str, str, int, bool]]:
        return [(source, entry, self.params.img_size, self.params.apply_voi_lut)
                for source, entry in todo]

    def _remembered(self, kind: str, path: Path, compute: Callable[[Path], str]) -> str:
        """`compute(path)`, remembered under `<cache_dir>/<kind>/` per (path, size, mtime) so
        later runs skip reading whole datasets again (a changed file is read afresh)."""
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise DicomError(f"{path}: file not found") from None
        stamp = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()
        memo = self.root / kind / hashlib.blake2b(stamp, digest_size=16).hexdigest()
        if memo.exists():
            return memo.read_text()
        value = compute(path)
        atomic_write(memo, lambda file: file.write(value.encode()))
        return value


def _header_json(path: Path, key: bytes) -> str:
    """What the memo keeps of a header: its fields, the PatientID as its pseudonym only
    (none for an anonymiser's placeholder)."""
    fields = read_header(path)
    fields["patient"] = patient_pseudonym(fields.pop("PatientID"), key)
    return json.dumps(fields, sort_keys=True)


def _file_digest(path: Path) -> str:
    """BLAKE2 of the file's bytes."""
    hasher = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            hasher.update(chunk)
    return hasher.hexdigest()


def load_entry(entry: str | os.PathLike) -> np.ndarray:
    """A cached uint16 square."""
    return np.load(entry)


def pixel_digest(entry: str | os.PathLike) -> str:
    """BLAKE2 of a cached square's pixels. Two files holding the same film (the same picture
    exported twice, under other UIDs and ids) differ in their bytes but decode to the same
    pixels, so equal pixel digests find repeated films where file digests cannot."""
    return square_digest(load_entry(entry))


def square_digest(square: np.ndarray) -> str:
    """`pixel_digest` of a square already loaded."""
    return hashlib.blake2b(square.tobytes(), digest_size=16).hexdigest()


def _build_entry_star(job: tuple[str, str, int, bool]) -> tuple[str, str | None]:
    """Decode one file into its entry; return (file, error message or None) instead of
    raising, so one bad file in a worker does not take the pool down."""
    source, entry, img_size, apply_voi_lut = job
    try:
        image = load_square(source, img_size, apply_voi_lut=apply_voi_lut)
    except Exception as error:  # read_xray words every file problem; anything else is one too
        return source, error_line(source, error)
    atomic_write(Path(entry), lambda file: np.save(file, image))
    return source, None
