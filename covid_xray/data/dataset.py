"""torch Dataset over cached squares: normalise, augment (train only), shape for the model."""

from __future__ import annotations

import os
import random
from collections.abc import Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from covid_xray.config import AugmentConfig, TrainConfig
from covid_xray.imaging.cache import load_entry
from covid_xray.imaging.preprocess import normalize, to_model_input
from covid_xray.imaging.workers import one_thread_per_worker

DEFAULTS = TrainConfig()

def build_augmentation(config: AugmentConfig, seed: int) -> A.Compose | None:
    """albumentations pipeline for `config`, or None when everything is off.

    Applied to float images in [0, 1], before scaling to the model's range: albumentations
    clips float pixels to [0, 1], which would destroy [-1024, 1024] inputs. It keeps its own
    random state and ignores global seeds, hence `seed` here (and `init_worker` in workers).
    """
    if not config.enabled:
        return None
    transforms: list[A.BasicTransform] = []
    if config.rotation or config.scale or config.shear or config.translation:
        transforms.append(A.Affine(
            scale=(1 - config.scale, 1 + config.scale),
            translate_percent=(-config.translation, config.translation),
            rotate=(-config.rotation, config.rotation),
            shear=(-config.shear, config.shear),
            border_mode=cv2.BORDER_CONSTANT, fill=0, p=1.0,
        ))
    if config.hflip:
        transforms.append(A.HorizontalFlip(p=0.5))
    if config.vflip:
        transforms.append(A.VerticalFlip(p=0.5))
    pipeline = A.Compose(transforms)
    reseed(pipeline, seed)
    return pipeline


def reseed(pipeline: A.Compose, seed: int) -> None:
    """One seeded stream shared by every transform. Not `Compose(seed=)`: albumentations 2.0
    gives each transform its own generator seeded alike, so a horizontal and a vertical flip
    would always toss the same coin."""
    pipeline.set_random_state(np.random.default_rng(seed), random.Random(seed))


def init_worker(worker_id: int) -> None:
    """`worker_init_fn` for DataLoaders: reseed this worker's copy of the augmentation (and
    numpy, random) from the seed torch gives the worker. That seed is the loader's seeded
    generator's draw plus the worker id, so a run repeats exactly with the same seed and
    num_workers, and two workers never replay each other's augmentations.

    OpenCV's own thread pool is cut to one thread per worker (the workers fill the cores).
    Workers must come from the forkserver (`decoding.worker_context()`, as training's do): in
    a worker forked plainly from a process whose OpenCV threads ran, that pool's lock may be
    held by a thread that no longer exists, and this call waits on it for ever.

    (Workers keep the default SIGTERM: multiprocessing ends them with it at exit, and one
    that ignored it hung the main process there.)
    """
    one_thread_per_worker()
    info = torch.utils.data.get_worker_info()
    seed = info.seed % 2**32
    random.seed(seed)
    np.random.seed(seed)
    augmentation = getattr(info.dataset, "augmentation", None)
    if augmentation is not None:
        reseed(augmentation, seed)


class XrayDataset(Dataset):
    """(input tensor, label) pairs read from cache entries."""

    def __init__(
        self,
        entries: Sequence[str | os.PathLike],
        labels: Sequence[int],
        *,
        normalization: str = DEFAULTS.normalization,
        input_kind: str = DEFAULTS.input_kind,
        augmentation: A.Compose | None = None,
    ):
        if len(entries) != len(labels):
            raise ValueError(f"{len(entries)} entries but {len(labels)} labels")
        self.entries = list(entries)
        self.labels = [int(label) for label in labels]
        self.normalization = normalization
        self.input_kind = input_kind
        self.augmentation = augmentation

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = normalize(load_entry(self.entries[index]), self.normalization)
        if self.augmentation is not None:
            image = self.augmentation(image=image)["image"]
        array = to_model_input(np.ascontiguousarray(image), self.input_kind)
        return torch.from_numpy(array), self.labels[index]
