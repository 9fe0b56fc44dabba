"""Helpers the bench scripts share (run as `python bench/<script>.py`, this folder is on
sys.path)."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator, Sequence

import pydicom

from covid_xray.imaging import dicom


def describe(paths: Sequence[object]) -> str:
    """What the files really are, read from their headers: bits stored and transfer syntaxes,
    counted (a benchmark prints what it measured, not what it meant to)."""
    bits: Counter[int] = Counter()
    syntaxes = set()
    for path in paths:
        header = pydicom.dcmread(path, stop_before_pixels=True)
        bits[int(header.BitsStored)] += 1
        syntaxes.add(header.file_meta.TransferSyntaxUID.name)
    depth = ", ".join(f"{count} x {value}-bit" for value, count in sorted(bits.items()))
    return f"{depth}; {len(syntaxes)} transfer syntaxes"


@contextlib.contextmanager
def pydicom_plugins_only() -> Iterator[None]:
    """read_xray as it was before imaging/decoders.py: pydicom's plugins in pydicom's order (GDCM
    first). In this process only (decoding workers are not affected)."""
    original = dicom._decode_fast
    dicom._decode_fast = lambda ds, first: None
    try:
        yield
    finally:
        dicom._decode_fast = original
