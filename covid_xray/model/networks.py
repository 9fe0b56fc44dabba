"""DenseNets: torchxrayvision chest-X-ray weights, torchvision ImageNet weights, or random init."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torchvision
import torchxrayvision as xrv
from torch import nn

from covid_xray.config import DEVICES, MODEL_FAMILIES, TTA_MODES
from covid_xray.errors import UserError
from covid_xray.evaluation.gradcam import feature_maps, read_out


class Classifier(nn.Module):
    """The network plus the softmax: what we log, register and serve returns probabilities.

    `tta="flip"` averages the probabilities of each film and its mirror image. `temperature`
    (fitted on validation after training, evaluation/calibration.py) divides the
    log-probabilities before the final softmax. Both live here, inside the logged model, so
    train's test split, predict and serve all apply them alike.
    """

    def __init__(self, network: nn.Module, class_names: tuple[str, ...], tta: str = "none",
                 temperature: float = 1.0):
        super().__init__()
        if tta not in TTA_MODES:
            raise UserError(f"tta must be one of {', '.join(TTA_MODES)}, got {tta!r}")
        self.network = network
        self.class_names = tuple(class_names)
        self.tta = tta
        self.temperature = float(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.answer(x)[0]

    def answer(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Probabilities, and the penultimate features of the film as given (the pooled vector
        the head reads: the forward taken apart at the head, no second pass), for the distance
        to training (evaluation/outliers.py). Nothing is registered on the network, which a
        served model shares between concurrent requests. A network that is not a DenseNet
        (no `features` and `classifier`) gives no features."""
        if all(isinstance(getattr(self.network, part, None), nn.Module)
               for part in ("features", "classifier")):
            logits, features = read_out(self.network, feature_maps(self.network, x))
            features = features.float()
        else:
            logits, features = self.network(x), x.new_zeros((len(x), 0))
        log_probabilities = torch.log_softmax(logits.float(), dim=1)
        if self.tta == "flip":
            mirrored = torch.log_softmax(self.network(x.flip(-1)).float(), dim=1)
            # log of the mean of the two probabilities, computed stably in log space
            log_probabilities = torch.logaddexp(log_probabilities, mirrored) - math.log(2)
        return torch.softmax(log_probabilities / self.temperature, dim=1), features

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("tta", "none")  # models pickled before TTA existed
        self.__dict__.setdefault("temperature", 1.0)


def resolve_device(name: str) -> torch.device:
    """`auto` (CUDA when a GPU is visible, else CPU), `cpu` or `cuda` (refused without one)."""
    if name not in DEVICES:
        raise UserError(f"device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA GPU is visible; use device=auto or cpu")
    return torch.device(name)


def build(name: str, num_classes: int, drop_rate: float = 0.0, weights_dir: str = "") -> nn.Module:
    """A DenseNet with a fresh `num_classes` head, in train mode, returning logits.

    Pretrained weights are read from `weights_dir` (or the library's default cache) and
    downloaded there when missing; when that fails the error says which URL to fetch and
    the exact path to put it at. We never fall back to random weights silently.
    """
    family = MODEL_FAMILIES.get(name)
    if family is None:
        raise UserError(f"model must be one of {', '.join(MODEL_FAMILIES)}, got {name!r}")
    if family.source == "random":
        return architecture(name, num_classes, drop_rate)
    if family.source == "torchxrayvision":
        return _xrv_densenet(name, num_classes, drop_rate, weights_dir)
    return _torchvision_densenet(name, num_classes, drop_rate, weights_dir)


def architecture(name: str, num_classes: int, drop_rate: float = 0.0) -> nn.Module:
    """The network `build` makes for `name`, randomly initialised: `build`'s network for
    `none`, and what a logged state_dict is loaded into. Build it under
    `torch.device("meta")` to skip the random init."""
    if MODEL_FAMILIES[name].source == "torchvision":
        model = torchvision.models.get_model(name, weights=None, drop_rate=drop_rate)
        model.classifier = nn.Linear(model.classifier.in_features, num_classes)
        return model
    # torchxrayvision's DenseNet, random or pretrained: `_xrv_densenet` leaves the pretrained
    # one with exactly this shape and forward (new head, no op_threshs, no sigmoid).
    return xrv.models.DenseNet(num_classes=num_classes, in_channels=1, drop_rate=drop_rate)


def xrv_weights_path(name: str, weights_dir: str = "") -> tuple[str, Path]:
    """(download URL, local path) of the torchxrayvision weights `name` stands for."""
    url = xrv.models.model_urls[MODEL_FAMILIES[name].weights]["weights_url"]
    folder = Path(os.path.expanduser(weights_dir or xrv.utils.get_cache_dir()))
    return url, folder / os.path.basename(url)


def _xrv_densenet(name: str, num_classes: int, drop_rate: float, weights_dir: str) -> nn.Module:
    url, path = xrv_weights_path(name, weights_dir)
    if not path.is_file():
        try:
            xrv.models.get_weights(MODEL_FAMILIES[name].weights, str(path.parent))
        except Exception as error:
            raise UserError(f"torchxrayvision weights '{name}' are not at {path} and could not "
                            f"be downloaded ({type(error).__name__}); download {url} and save "
                            f"it as {path}") from None
    try:
        model = xrv.models.DenseNet(weights=MODEL_FAMILIES[name].weights,
                                    cache_dir=str(path.parent), drop_rate=drop_rate)
    except Exception as error:
        raise UserError(f"{path}: not a usable torchxrayvision DenseNet weights file ({error}); "
                        f"delete it and download {url} again") from None
    # The pretrained head predicts 18 pathologies through sigmoid + operating-point
    # calibration (op_threshs). Fine-tuning needs raw logits for our classes: new head, no
    # calibration, and train mode (the constructor left it in eval mode).
    model.classifier = nn.Linear(model.classifier.in_features, num_classes)
    model.op_threshs = None
    model.apply_sigmoid = False
    # Inputs are already 224 px and in [-1024, 1024]; skip xrv's per-forward resize/range check.
    if hasattr(model, "input_resolution"):
        del model.input_resolution
    return model.train()


def _torchvision_densenet(name: str, num_classes: int, drop_rate: float,
                          weights_dir: str) -> nn.Module:
    weights = torchvision.models.get_model_weights(name).DEFAULT
    # torchvision reads its weights from torch.hub's folder, a process-wide setting: point it
    # at weights_dir for this load only, so nothing else in the process is redirected.
    previous_dir = torch.hub.get_dir()
    if weights_dir:
        torch.hub.set_dir(os.path.expanduser(weights_dir))
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    try:
        model = torchvision.models.get_model(name, weights=weights, drop_rate=drop_rate)
    except Exception as error:
        raise UserError(f"torchvision weights for {name} are not at {path} and could not be "
                        f"downloaded ({type(error).__name__}); download {weights.url} and save "
                        f"it as {path}") from None
    finally:
        torch.hub.set_dir(previous_dir)
    model.classifier = nn.Linear(model.classifier.in_features, num_classes)
    return model.train()
