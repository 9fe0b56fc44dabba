"""Crop, resize, normalise, augment, shape for the model: exact values on tiny arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from covid_xray.config import AugmentConfig
from covid_xray.data.dataset import XrayDataset, build_augmentation, init_worker
from covid_xray.errors import UserError
from covid_xray.imaging.preprocess import (
    crop_square,
    load_square,
    normalize,
    resize,
    to_model_input,
)
from covid_xray.imaging.workers import worker_context
from covid_xray.imaging.writer import write_dicom


def test_crop_square_takes_the_centre():
    image = np.arange(4 * 6).reshape(4, 6)
    np.testing.assert_array_equal(crop_square(image), image[:, 1:5])
    np.testing.assert_array_equal(crop_square(image.T), image.T[1:5, :])


def test_area_resize_averages_blocks():
    image = np.array([[0, 2, 4, 4], [2, 4, 4, 4], [1, 1, 0, 0], [1, 1, 0, 0]], np.float32)
    np.testing.assert_array_equal(resize(image, 2), [[2, 4], [1, 0]])


def test_load_square_is_decode_crop_resize_quantise(tmp_path):
    stored = np.zeros((60, 80), np.uint16)
    stored[:, 10:70] = 4095  # the centre 60x60 is bright, the side bands dark
    stored[:30, 10:40] = 0  # one dark quadrant inside the crop
    write_dicom(tmp_path / "x.dcm", stored)
    square = load_square(tmp_path / "x.dcm", 2)
    assert square.dtype == np.uint16
    np.testing.assert_array_equal(square, [[0, 65535], [65535, 65535]])


def test_normalizations():
    image = np.array([[1000, 2000], [3000, 5000]], np.uint16)
    np.testing.assert_allclose(normalize(image, "minmax"), [[0, 0.25], [0.5, 1]])
    assert normalize(np.full((2, 2), 7, np.uint16), "minmax").max() == 0
    ramp = np.tile(np.arange(0, 64, dtype=np.uint16) ** 2, (64, 1))
    equalised = normalize(ramp, "histeq")
    assert equalised.min() >= 0 and equalised.max() == 1
    # Equalisation spreads a skewed histogram: its mean moves towards 0.5.
    assert abs(equalised.mean() - 0.5) < abs(normalize(ramp, "minmax").mean() - 0.5)
    clahe = normalize(ramp, "clahe")
    assert clahe.shape == ramp.shape and clahe.min() >= 0 and clahe.max() <= 1
    with pytest.raises(UserError, match="normalization must be one of minmax, histeq, clahe"):
        normalize(image, "zscore")


def test_model_inputs():
    image = np.array([[0.0, 0.5], [1.0, 0.25]], np.float32)
    xrv = to_model_input(image, "xrv")
    assert xrv.shape == (1, 2, 2)
    np.testing.assert_allclose(xrv[0], [[-1024, 0], [1024, -512]])
    imagenet = to_model_input(image, "imagenet")
    assert imagenet.shape == (3, 2, 2)
    np.testing.assert_allclose(imagenet[:, 0, 0], [-0.485 / 0.229, -0.456 / 0.224,
                                                   -0.406 / 0.225], rtol=1e-6)


def test_augmentation_off_by_default_and_changes_images_when_on():
    assert build_augmentation(AugmentConfig(), seed=0) is None
    image = np.zeros((32, 32), np.float32)
    image[4:12, 2:10] = 1.0
    flip = build_augmentation(AugmentConfig(hflip=True, vflip=True), seed=0)
    outcomes = {flip(image=image)["image"].tobytes() for _ in range(40)}
    assert len(outcomes) == 4  # each flip is a coin toss: four distinct results
    affine = build_augmentation(AugmentConfig(rotation=20, scale=0.3, shear=20, translation=0.4),
                                seed=0)
    moved = affine(image=image)["image"]
    assert moved.dtype == np.float32 and moved.shape == image.shape
    assert moved.min() >= 0 and moved.max() <= 1
    assert not np.array_equal(moved, image)


def test_dataset_items(tmp_path):
    entries = []
    for index in range(3):
        np.save(tmp_path / f"{index}.npy", np.full((8, 8), index * 1000, np.uint16)
                + np.arange(64, dtype=np.uint16).reshape(8, 8))
        entries.append(tmp_path / f"{index}.npy")
    dataset = XrayDataset(entries, [0, 1, 1], input_kind="xrv")
    tensor, label = dataset[1]
    assert len(dataset) == 3 and label == 1
    assert tensor.dtype == torch.float32 and tensor.shape == (1, 8, 8)
    assert tensor.min() == -1024 and tensor.max() == 1024
    tensor, _ = XrayDataset(entries, [0, 1, 1], input_kind="imagenet")[0]
    assert tensor.shape == (3, 8, 8)


def augmented_epochs(entries, seed: int, num_workers: int, epochs: int = 2) -> list[np.ndarray]:
    augmentation = build_augmentation(AugmentConfig(rotation=20, translation=0.2, hflip=True),
                                      seed=seed)
    dataset = XrayDataset(entries, [0] * len(entries), augmentation=augmentation)
    # As training starts its workers: from the forkserver, not forked from this process.
    loader = DataLoader(dataset, batch_size=2, shuffle=True, num_workers=num_workers,
                        persistent_workers=num_workers > 0, worker_init_fn=init_worker,
                        multiprocessing_context=worker_context() if num_workers else None,
                        generator=torch.Generator().manual_seed(seed))
    return [torch.cat([images for images, _ in loader]).numpy() for _ in range(epochs)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_augmented_batches_repeat_exactly_with_the_same_seed(tmp_path, num_workers):
    """albumentations ignores global seeds: the pipeline's seed and the workers' must be set."""
    entries = []
    for index in range(8):  # the same picture 8 times: only augmentation tells them apart
        np.save(tmp_path / f"{index}.npy", (np.arange(256, dtype=np.uint16).reshape(16, 16) * 200))
        entries.append(tmp_path / f"{index}.npy")
    first = augmented_epochs(entries, seed=3, num_workers=num_workers)
    again = augmented_epochs(entries, seed=3, num_workers=num_workers)
    for one, two in zip(first, again, strict=True):
        np.testing.assert_array_equal(one, two)
    assert not np.array_equal(first[0], first[1])  # each epoch draws afresh
    other = augmented_epochs(entries, seed=4, num_workers=num_workers)
    assert not np.array_equal(first[0], other[0])
    # No two images of an epoch got the same augmentation (workers do not replay each other).
    assert len({image.tobytes() for image in first[0]}) == len(entries)
