"""Near-duplicate films: the same picture after a re-encoding, which no digest can see.

A training film saved again as JPEG, rescaled to 8 bits, or with a pixel changed has new
bytes and new pixels, so evaluation's file and pixel digests miss it, and scoring it would
flatter the model. What stays is the picture: each film is reduced to a `SIDE` x `SIDE`
thumbnail of its cached square, standardised (mean 0, standard deviation 1, so brightness and
contrast do not count), and two films are near-duplicates when the root-mean-square
difference of their thumbnails is under `NEAR_DUPLICATE`.

The threshold, measured on the 64 px demo films (tests/test_likeness.py keeps it so): a film
re-encoded as JPEG at quality 90 is 0.007 from itself, rescaled to 8 bits 0.0015, given +-1
noise 0.00002; the closest two different demo films (synthetic: drawn alike) are 0.034
apart, and real films of one patient, taken at other times and positioned anew, differ
more. 0.015 leaves a factor of two on both sides.
"""

from __future__ import annotations

import cv2
import numpy as np

SIDE = 16
NEAR_DUPLICATE = 0.015  # RMS difference of two standardised thumbnails


def thumbnail(square: np.ndarray) -> np.ndarray:
    """A cached square (any size) as its standardised `SIDE` x `SIDE` thumbnail, float32."""
    small = cv2.resize(square.astype(np.float32), (SIDE, SIDE), interpolation=cv2.INTER_AREA)
    small -= small.mean()
    spread = float(small.std())
    return small / spread if spread > 0 else small  # a blank film stays all zeros


def nearest_distance(thumbnails: np.ndarray, known: np.ndarray, chunk: int = 2048
                     ) -> np.ndarray:
    """For each of `thumbnails` (n, SIDE, SIDE), the RMS distance to the closest of `known`
    (m, SIDE, SIDE); inf when `known` is empty. Computed as sqrt(|a|^2 + |b|^2 - 2 a.b) per
    pixel, in chunks: a 6,000 x 6,000 comparison is one matrix product, not 36 M loops."""
    if len(known) == 0:
        return np.full(len(thumbnails), np.inf)
    a = thumbnails.reshape(len(thumbnails), -1).astype(np.float64)
    b = known.reshape(len(known), -1).astype(np.float64)
    b_norms = (b * b).sum(axis=1)
    nearest = np.empty(len(a))
    for start in range(0, len(a), chunk):
        part = a[start : start + chunk]
        squared = (part * part).sum(axis=1)[:, None] + b_norms[None] - 2 * part @ b.T
        nearest[start : start + chunk] = squared.min(axis=1)
    return np.sqrt(np.clip(nearest, 0, None) / a.shape[1])
