"""Data pipeline throughput: decode-every-epoch (the original project) vs our decode-once cache.

Writes synthetic SIIM studies at realistic size (2048 px; 8-, 12- and 16-bit; every encoding
in covid_xray.data.synthetic.ENCODINGS), then measures images/s, all in one process, side by side:
  (a) decode (pydicom's own plugins, GDCM first) + skimage anti-aliased resize every epoch,
      as the original project did;
  (b) our first epoch: hash, decode (our imagecodecs plugin first), crop, cv2 area resize,
      write the cache, then load;
  (c) our later epochs: load from the cache only.
Each pass yields the same model inputs (normalised, [-1024, 1024]) to make the work comparable.

    python bench/data_pipeline.py [--studies 18] [--size 2048] [--img-size 128]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click
import numpy as np
from common import describe, pydicom_plugins_only  # bench/common.py
from skimage.transform import resize as skimage_resize

from covid_xray.data.dataset import XrayDataset
from covid_xray.data.synthetic import ENCODINGS, make_dataset
from covid_xray.imaging.cache import CacheParams, ImageCache
from covid_xray.imaging.dicom import read_xray
from covid_xray.imaging.preprocess import crop_square, normalize, to_model_input


def original_epoch(paths: list[Path], img_size: int) -> None:
    for path in paths:
        image = skimage_resize(crop_square(read_xray(path)), (img_size, img_size),
                               anti_aliasing=True)
        to_model_input(normalize(np.round(image * 65535).astype(np.uint16)), "xrv")


def cached_epoch(entries: list[Path]) -> None:
    dataset = XrayDataset(entries, [0] * len(entries))
    for index in range(len(dataset)):
        dataset[index]


def rate(count: int, work) -> float:
    start = time.perf_counter()
    work()
    return count / (time.perf_counter() - start)


@click.command()
@click.option("--studies", default=2 * len(ENCODINGS), show_default=True)
@click.option("--size", default=2048, show_default=True, help="Rows of each film.")
@click.option("--img-size", default=128, show_default=True, help="Model input side.")
@click.option("--cached-epochs", default=5, show_default=True)
def main(studies: int, size: int, img_size: int, cached_epochs: int) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = make_dataset(Path(scratch) / "data", num_studies=studies, image_size=size,
                                multi_image_studies=0, seed=0)
        paths = sorted(data_dir.glob("train/*/*/*.dcm"))
        megabytes = sum(p.stat().st_size for p in paths) / 1e6
        print(f"{len(paths)} DICOMs, {size} px rows ({describe(paths)}), "
              f"{megabytes:.0f} MB; model input {img_size} px; one process")

        with pydicom_plugins_only():
            original = rate(len(paths), lambda: original_epoch(paths, img_size))
        cache = ImageCache(Path(scratch) / "cache", CacheParams(img_size=img_size))
        entries: list[Path] = []

        def first_epoch() -> None:
            entries.extend(cache.build(paths, progress=False)[0])
            cached_epoch(entries)

        first = rate(len(paths), first_epoch)
        cached = rate(len(paths) * cached_epochs,
                      lambda: [cached_epoch(entries) for _ in range(cached_epochs)])

    print(f"(a) decode + skimage resize every epoch : {original:10.1f} images/s")
    print(f"(b) first epoch, building the cache     : {first:10.1f} images/s")
    print(f"(c) cached epochs                       : {cached:10.1f} images/s")
    print(f"(b)/(a) = {first / original:.2f}x   (c)/(a) = {cached / original:.0f}x")


if __name__ == "__main__":
    main()
