"""Grad-CAM points at the evidence: a network that detects a planted blob, at 128 px.

At 32 px DenseNet's last feature map is 1x1, so any target layer gives a flat map and a test
there cannot fail. At 128 px it is 4x4: the heatmap must light up the quadrant holding the
blob. A target without spatial extent (a pooled map, or the classifier's input) gives a flat
map and fails here, as do gradient weights of the wrong sign (both checked by mutation).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from covid_xray.evaluation.gradcam import grad_cam
from covid_xray.model.networks import build

SIZE = 128
RADIUS = 12


def film(rng: np.random.Generator, blob_at: tuple[int, int] | None) -> np.ndarray:
    """A flat noisy film in the xrv input range, with a bright disk at `blob_at`."""
    rows, cols = np.mgrid[0:SIZE, 0:SIZE]
    image = 0.3 + 0.05 * rng.normal(size=(SIZE, SIZE))
    if blob_at is not None:
        image += 0.6 * (((rows - blob_at[0]) ** 2 + (cols - blob_at[1]) ** 2) < RADIUS**2)
    return (np.clip(image, 0, 1) * 2048 - 1024).astype(np.float32)[None]


@pytest.fixture(scope="module")
def blob_detector() -> torch.nn.Module:
    """A DenseNet121 whose head is fitted to tell films with a blob (anywhere) from films
    without: its 'positive' score rests on the blob, wherever it is."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    network = build("none", num_classes=2).eval()
    films, labels = [], []
    for index in range(48):
        has_blob = index % 2 == 1
        at = tuple(rng.integers(RADIUS + 4, SIZE - RADIUS - 4, size=2)) if has_blob else None
        films.append(film(rng, at))
        labels.append(int(has_blob))
    with torch.no_grad():
        maps = torch.relu(network.features(torch.from_numpy(np.stack(films))))
        pooled = maps.mean(dim=(2, 3)).numpy()
    head = LogisticRegression(max_iter=5000).fit(pooled, labels)
    assert head.score(pooled, labels) == 1.0
    with torch.no_grad():
        weights = np.stack([-head.coef_[0], head.coef_[0]]) / 2
        network.classifier.weight.copy_(torch.from_numpy(weights))
        network.classifier.bias.zero_()
    return network


@pytest.mark.parametrize("blob_at", [(32, 32), (32, 96), (96, 32), (96, 96)])
def test_heatmap_lights_up_the_planted_blob(blob_detector, blob_at):
    heatmap = grad_cam(blob_detector, film(np.random.default_rng(1), blob_at), class_index=1)
    assert heatmap.shape == (SIZE, SIZE) and heatmap.max() == pytest.approx(1.0)
    row, col = blob_at
    inside = heatmap[row - RADIUS : row + RADIUS, col - RADIUS : col + RADIUS].mean()
    assert inside > 2 * heatmap.mean()
    # The hottest point is in the blob's quadrant, the opposite quadrant is cold.
    peak = np.unravel_index(heatmap.argmax(), heatmap.shape)
    assert (peak[0] < SIZE // 2) == (row < SIZE // 2) and (peak[1] < SIZE // 2) == (col < SIZE // 2)
    opposite = heatmap[(slice(SIZE // 2, None) if row < SIZE // 2 else slice(0, SIZE // 2)),
                       (slice(SIZE // 2, None) if col < SIZE // 2 else slice(0, SIZE // 2))]
    assert opposite.mean() < inside / 2
