"""Grad-CAM: where in the film the network looked for the class it predicted.

Selvaraju et al. 2017: weight the last convolutional feature maps by the spatial mean of the
class score's gradient, keep the positive part, upsample. Both DenseNet families keep those
maps in `.features` and read them out the same way (ReLU, global average pool, `.classifier`);
`feature_maps` and `read_out` take that forward apart, here and for the classifier's
penultimate features (model/networks.py).

A served model answers many requests at once on one shared network: nothing here registers
hooks on it or leaves gradients in its parameters. The gradient is taken with respect to the
call's own feature maps only (`torch.autograd.grad`), so concurrent calls share nothing.
"""

from __future__ import annotations

from os import PathLike

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from covid_xray.imaging.dicom import read_xray
from covid_xray.imaging.preprocess import Preprocessing, square_box


def feature_maps(network: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A DenseNet's last feature maps as its head reads them (after the final ReLU)."""
    return F.relu(network.features(x))


def read_out(network: nn.Module, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, pooled features) from `feature_maps`: the rest of the DenseNet's forward."""
    pooled = torch.flatten(F.adaptive_avg_pool2d(maps, 1), 1)
    return network.classifier(pooled), pooled


def grad_cam(network: nn.Module, model_input: np.ndarray, class_index: int) -> np.ndarray:
    """Heatmap in [0, 1] with the model input's height and width. `network` is in eval mode
    and is not changed."""
    if network.training:
        raise ValueError("grad_cam reads a network in eval mode (train mode would update "
                         "BatchNorm's statistics)")
    device = next(network.parameters()).device  # the model may answer on CUDA
    batch = torch.from_numpy(model_input[None]).to(device)
    with torch.no_grad():
        maps = feature_maps(network, batch)
    maps.requires_grad_(True)  # a leaf of this call's own: the parameters get no gradient
    with torch.enable_grad():
        logits, _ = read_out(network, maps)
        (gradient,) = torch.autograd.grad(logits[0, class_index], maps)
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * maps.detach()).sum(dim=1))[0].float().cpu().numpy()
    cam = cv2.resize(cam, model_input.shape[::-1][:2], interpolation=cv2.INTER_LINEAR)
    peak = float(cam.max())
    return cam / peak if peak > 0 else cam


def overlay(source: str | PathLike, heatmap: np.ndarray, preprocessing: Preprocessing,
            strength: float = 0.4) -> np.ndarray:
    """The film at its own size (BGR uint8) with the heatmap over the centre square the model
    saw; outside that square the film is left as it is."""
    image = read_xray(source, apply_voi_lut=preprocessing.apply_voi_lut)
    gray = np.round(image * 255).astype(np.uint8)
    picture = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    top, left, side = square_box(image.shape)
    heat = cv2.resize(heatmap.astype(np.float32), (side, side), interpolation=cv2.INTER_LINEAR)
    colour = cv2.applyColorMap(np.round(heat * 255).astype(np.uint8), cv2.COLORMAP_JET)
    region = picture[top : top + side, left : left + side]
    picture[top : top + side, left : left + side] = cv2.addWeighted(
        region, 1 - strength, colour, strength, 0)
    return picture
