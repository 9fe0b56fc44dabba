"""The only preprocessing code: training, prediction and serving all go through here.

Two stages, split where the cache sits:
1. `load_square(path, size)`: decode, centre-crop to a square, area-resize, quantise to uint16.
   Slow (the decode), so its output is what the cache stores.
2. `normalize` -> (augmentation, train only) -> `to_model_input`: cheap, done per sample, so
   trying another normalisation does not invalidate the cache.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from os import PathLike
from typing import BinaryIO

import cv2
import numpy as np

from covid_xray.config import INPUT_KINDS, NORMALIZATIONS, TrainConfig
from covid_xray.errors import UserError
from covid_xray.imaging.dicom import read_film, read_xray

# Defaults are training's (TrainConfig), so a Preprocessing made by hand sees what training
# sees unless told otherwise.
DEFAULTS = TrainConfig()

UINT16_MAX = 65535
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def square_box(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(top, left, side) of the largest centred square of an image of `shape`: chest films are
    near-square and the lungs sit in the middle. Grad-CAM overlays use the same box."""
    rows, cols = shape[:2]
    side = min(rows, cols)
    return (rows - side) // 2, (cols - side) // 2, side


def crop_square(image: np.ndarray) -> np.ndarray:
    top, left, side = square_box(image.shape)
    return image[top : top + side, left : left + side]


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Area-averaging resize: anti-aliased like skimage's, ~30x faster on 2500 px films."""
    if image.shape == (size, size):
        return image
    shrinking = image.shape[0] > size
    return cv2.resize(image, (size, size),
                      interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def load_square(path: str | PathLike | BinaryIO, size: int, *,
                apply_voi_lut: bool = True) -> np.ndarray:
    """DICOM -> `size` x `size` uint16 (0..65535): the cached form of every image.

    uint16 keeps 12-bit films' full depth at a quarter of float32's bytes (float64 ->
    uint16 rounding error is below 1e-5, far under any detector's noise).
    """
    return square_of(read_xray(path, apply_voi_lut=apply_voi_lut), size)


def square_of(image: np.ndarray, size: int) -> np.ndarray:
    """A decoded film -> its centre square at `size` px as uint16 (see `load_square`)."""
    square = resize(crop_square(image), size)
    return np.round(np.clip(square, 0, 1) * UINT16_MAX).astype(np.uint16)


def normalize(image: np.ndarray, method: str = DEFAULTS.normalization) -> np.ndarray:
    """uint16 square -> float32 in [0, 1] with the contrast `method` asks for.

    minmax stretches the darkest pixel to 0 and the brightest to 1 (the original project's
    default); histeq flattens the histogram; clahe equalises locally, limiting noise gain.
    """
    if method == "minmax":
        return _stretch(image)
    if method == "histeq":
        return cv2.equalizeHist(_to_uint8(image)).astype(np.float32) / 255.0
    if method == "clahe":
        clahe = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8))
        return clahe.apply(_to_uint8(image)).astype(np.float32) / 255.0
    raise UserError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, got {method!r}")


def to_model_input(image: np.ndarray, kind: str) -> np.ndarray:
    """float [0, 1] H x W -> the float32 C x H x W array the network expects.

    torchxrayvision models were trained on one channel scaled to [-1024, 1024]; torchvision's
    on three ImageNet-normalised channels.
    """
    image = np.clip(image, 0.0, 1.0).astype(np.float32)  # augmentation may overshoot slightly
    if kind == "xrv":
        return (image * 2048.0 - 1024.0)[None]
    if kind == "imagenet":
        return (image[None] - IMAGENET_MEAN[:, None, None]) / IMAGENET_STD[:, None, None]
    raise ValueError(f"input kind must be one of {INPUT_KINDS}, got {kind!r}")


@dataclass(frozen=True)
class Preprocessing:
    """What a trained model needs to see its inputs as in training; logged with the model."""

    img_size: int
    normalization: str = DEFAULTS.normalization
    apply_voi_lut: bool = DEFAULTS.apply_voi_lut
    input_kind: str = DEFAULTS.input_kind

    @classmethod
    def of(cls, config: TrainConfig) -> Preprocessing:
        """The preprocessing a training config trains (and so its model predicts) with."""
        return cls(config.img_size, config.normalization, config.apply_voi_lut,
                   config.input_kind)

    def read(self, source: str | PathLike | BinaryIO
             ) -> tuple[np.ndarray, dict[str, str], tuple[str, ...]]:
        """A DICOM (path or binary file) the input gate lets through -> the float32 C x H x W
        array the model takes (the same steps training runs, cache and dataset included,
        minus augmentation), the film's UIDs and the gate's flags. Refused: DicomError."""
        film = read_film(source, apply_voi_lut=self.apply_voi_lut, gate=True)
        square = square_of(film.image, self.img_size)
        model_input = to_model_input(normalize(square, self.normalization), self.input_kind)
        return model_input, film.uids, film.flags

    def model_input(self, source: str | PathLike | BinaryIO) -> np.ndarray:
        """Just the model input of `read`."""
        return self.read(source)[0]

    def as_dict(self) -> dict:
        return asdict(self)


def _stretch(image: np.ndarray) -> np.ndarray:
    """Min-max to float32 [0, 1]; a constant image becomes all zeros."""
    image = image.astype(np.float32)
    low, high = float(image.min()), float(image.max())
    return (image - low) / (high - low) if high > low else np.zeros_like(image)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """OpenCV's equalisers want 8-bit input."""
    return np.round(_stretch(image) * 255).astype(np.uint8)
