"""Grad-CAM: where in the film the network looked for the class it predicted.

Selvaraju et al. 2017: weight the last convolutional feature maps by the spatial mean of the
class score's gradient, keep the positive part, upsample. Both DenseNet families keep those
maps in `.features`.
"""

from __future__ import annotations

from os import PathLike

import cv2
import numpy as np
import torch
from torch import nn

from covid_xray.imaging.dicom import read_xray
from covid_xray.imaging.preprocess import Preprocessing, square_box


def grad_cam(network: nn.Module, model_input: np.ndarray, class_index: int) -> np.ndarray:
    """Heatmap in [0, 1] with the model input's height and width."""
    captured: dict[str, torch.Tensor] = {}

    def keep(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        output.retain_grad()
        captured["maps"] = output

    hook = network.features.register_forward_hook(keep)
    try:
        network.eval()
        device = next(network.parameters()).device  # the model may answer on CUDA
        batch = torch.from_numpy(model_input[None]).to(device).requires_grad_(True)
        network.zero_grad()
        network(batch)[0, class_index].backward()
    finally:
        hook.remove()
    maps = captured["maps"]
    weights = maps.grad.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * maps).sum(dim=1))[0].detach().float().cpu().numpy()
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
