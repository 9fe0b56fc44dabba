"""Helpers the bench scripts share (run as `python bench/<script>.py`, this folder is on
sys.path)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import pydicom


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
