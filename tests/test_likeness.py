"""Near-duplicate films (imaging/likeness.py): a training film re-encoded stays within the
threshold of itself, different films stay beyond it; measured on the demo films."""

from __future__ import annotations

import imagecodecs
import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit

from covid_xray.imaging.likeness import NEAR_DUPLICATE, nearest_distance, thumbnail
from covid_xray.imaging.preprocess import load_square

SIZE = 64  # the demo films' size: the squares the model of the session store sees


def re_encoded(source, target, kind: str):
    """`source` saved as `target` after one of the re-encodings a copy goes through."""
    ds = pydicom.dcmread(source)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress()
    stored = ds.pixel_array.astype(np.int64)
    top = (1 << int(ds.BitsStored)) - 1
    if kind == "noise +-1":
        noisy = np.clip(stored + np.random.default_rng(0).integers(-1, 2, stored.shape), 0, top)
        ds.PixelData = noisy.astype(ds.pixel_array.dtype).tobytes()
    else:  # to 8 bits; as JPEG at quality 90 too
        eight = np.round(stored / top * 255).astype(np.uint8)
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelData = eight.tobytes()
        if kind == "JPEG quality 90":
            ds.PixelData = encapsulate([imagecodecs.jpeg8_encode(eight, level=90)])
            ds["PixelData"].VR = "OB"
            ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
            ds.LossyImageCompression = "01"
    ds.save_as(target)
    return target


def test_nearest_distance_is_the_brute_force_one():
    rng = np.random.default_rng(1)
    mine, known = rng.normal(size=(7, 16, 16)), rng.normal(size=(11, 16, 16))
    brute = [min(np.sqrt(np.mean((a - b) ** 2)) for b in known) for a in mine]
    np.testing.assert_allclose(nearest_distance(mine, known, chunk=3), brute, rtol=1e-9)
    assert np.isinf(nearest_distance(mine, known[:0])).all()


@pytest.mark.parametrize("kind", ["noise +-1", "8-bit rescale", "JPEG quality 90"])
def test_a_re_encoded_film_is_within_the_threshold_and_other_films_are_beyond(
        kind, demo_dataset, tmp_path):
    films = sorted((demo_dataset / "train").rglob("*.dcm"))
    thumbnails = np.stack([thumbnail(load_square(path, SIZE)) for path in films])
    copy = re_encoded(films[0], tmp_path / "copy.dcm", kind)
    assert copy.read_bytes() != films[0].read_bytes()
    (distance,) = nearest_distance(thumbnail(load_square(copy, SIZE))[None], thumbnails[:1])
    assert distance < NEAR_DUPLICATE / 2, distance
    # Every other demo film (different films, of other patients or the same one) is beyond.
    for index in range(len(films)):
        others = np.delete(thumbnails, index, axis=0)
        (nearest,) = nearest_distance(thumbnails[index][None], others)
        assert nearest > 2 * NEAR_DUPLICATE, (films[index].name, nearest)
