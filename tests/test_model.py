"""Model building: pretrained weights from a weights_dir, fresh heads, clear errors."""

from __future__ import annotations

import pytest
import torch
import torchxrayvision as xrv

from covid_xray.errors import UserError
from covid_xray.model.networks import Classifier, architecture, build, xrv_weights_path
from tests.conftest import no_internet


def test_xrv_weights_are_read_from_weights_dir(tmp_path):
    """A whole xrv DenseNet saved with torch.save, where xrv's cache would hold it."""
    torch.manual_seed(0)
    pretrained = xrv.models.DenseNet(num_classes=18)  # stands in for the published weights
    url, path = xrv_weights_path("all", str(tmp_path))
    assert path.parent == tmp_path and path.name == url.rsplit("/", 1)[1]
    torch.save(pretrained, path)

    model = build("all", num_classes=2, drop_rate=0.1, weights_dir=str(tmp_path))
    assert model.training  # xrv's constructor leaves eval mode; fine-tuning needs train mode
    assert model.op_threshs is None and not model.apply_sigmoid
    assert model.classifier.out_features == 2
    for name, tensor in pretrained.features.state_dict().items():
        assert torch.equal(model.features.state_dict()[name], tensor), name
    # Raw logits out (no sigmoid / op_threshs calibration), any input size accepted as is.
    logits = model.eval()(torch.full((2, 1, 64, 64), 500.0))
    assert logits.shape == (2, 2)
    probabilities = Classifier(model, ("negative", "opacity"))(torch.zeros(3, 1, 64, 64))
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(3))


def test_missing_weights_say_where_to_put_them(tmp_path, monkeypatch):
    for name, value in no_internet().items():  # the download fails, with internet or not
        monkeypatch.setenv(name, value)
    url, path = xrv_weights_path("rsna", str(tmp_path))
    with pytest.raises(UserError) as caught:
        build("rsna", num_classes=2, weights_dir=str(tmp_path))
    message = str(caught.value)
    assert url in message and str(path) in message and "\n" not in message
    assert not path.exists()


def test_corrupt_weights_file(tmp_path):
    _, path = xrv_weights_path("nih", str(tmp_path))
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a usable torchxrayvision DenseNet weights file"):
        build("nih", num_classes=2, weights_dir=str(tmp_path))


def test_random_init_and_unknown_names():
    model = build("none", num_classes=4)
    assert model.classifier.out_features == 4 and model.features.conv0.in_channels == 1
    with pytest.raises(UserError, match="model must be one of all, rsna"):
        build("resnet50", num_classes=2)


def test_torchvision_weights_missing_offline(tmp_path, monkeypatch):
    for name, value in no_internet().items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UserError, match=r"torchvision weights for densenet121 are not at .*checkpoints/densenet121-"):
        build("densenet121", num_classes=2, weights_dir=str(tmp_path))


@pytest.mark.parametrize("name", ["all", "none"])
def test_a_state_dict_loads_into_the_bare_architecture(name, tmp_path):
    """What a logged model's loader does: the architecture on the meta device (no init), then
    the trained weights assigned: the same network, output for output."""
    torch.manual_seed(0)
    torch.save(xrv.models.DenseNet(num_classes=18), xrv_weights_path("all", str(tmp_path))[1])
    trained = build(name, num_classes=3, weights_dir=str(tmp_path)).eval()
    with torch.device("meta"):
        bare = architecture(name, num_classes=3)
    bare.load_state_dict(trained.state_dict(), assign=True)
    images = torch.randn(2, 1, 32, 32) * 500
    with torch.no_grad():
        torch.testing.assert_close(bare.eval()(images), trained(images), rtol=0, atol=0)


def test_torchvision_weights_from_weights_dir_leave_torch_hub_as_it_was(tmp_path, monkeypatch):
    """torchvision finds weights through torch.hub's folder, a process-wide setting: pointed
    at weights_dir for the load, it must be back as it was afterwards."""
    import os

    import torchvision

    before = torch.hub.get_dir()
    torch.manual_seed(0)
    weights = torchvision.models.get_model_weights("densenet121").DEFAULT
    saved = torchvision.models.densenet121()
    (tmp_path / "checkpoints").mkdir()
    torch.save(saved.state_dict(), tmp_path / "checkpoints" / os.path.basename(weights.url))
    model = build("densenet121", num_classes=2, weights_dir=str(tmp_path))
    torch.testing.assert_close(model.features.conv0.weight, saved.features.conv0.weight)
    assert model.classifier.out_features == 2
    assert torch.hub.get_dir() == before

    def offline(url, *args, **kwargs):  # as here, and wherever the download fails
        raise ConnectionError(url)

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(UserError, match="could not be downloaded"):
        build("densenet121", num_classes=2, weights_dir=str(tmp_path / "empty"))
    assert torch.hub.get_dir() == before
