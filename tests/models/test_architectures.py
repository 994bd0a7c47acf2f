from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

from marginwatch.models.architectures import (
    ARCHITECTURES,
    FashionMnistCNN,
    LogitsAsFeatures,
    PreActResNet18,
)
from marginwatch.models.registry import ModelError, load_model, save_weights


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_shapes_and_split(name: str) -> None:
    torch.manual_seed(0)
    model = ARCHITECTURES[name]().eval()
    inputs = torch.rand(3, *model.input_shape)
    with torch.no_grad():
        features = model.features(inputs)
        logits = model(inputs)
    assert features.shape == (3, model.feature_dim)
    assert logits.shape == (3, model.num_classes)
    torch.testing.assert_close(model.head(features), logits)


def test_preact_resnet_uses_the_literature_layout() -> None:
    keys = set(PreActResNet18().state_dict())
    for key in [
        "conv1.weight",
        "layer1.0.bn1.weight",
        "layer2.0.shortcut.0.weight",
        "layer4.1.conv2.weight",
        "bn.running_mean",
        "linear.weight",
    ]:
        assert key in keys


def test_preact_resnet_normalises_inside() -> None:
    torch.manual_seed(0)
    plain = PreActResNet18().eval()
    shifted = PreActResNet18(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)).eval()
    shifted.load_state_dict(plain.state_dict())
    inputs = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(shifted(inputs), plain((inputs - 0.5) / 0.25))


def test_load_architecture_with_weights_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = FashionMnistCNN().eval()
    save_weights(model, tmp_path / "w.safetensors")
    torch.save(model.state_dict(), tmp_path / "w.pth")
    inputs = torch.rand(4, 1, 28, 28)
    for weights in ["w.safetensors", "w.pth"]:
        loaded = load_model("fmnist-cnn", tmp_path / weights)
        with torch.no_grad():
            torch.testing.assert_close(loaded(inputs), model(inputs))


def test_torchscript_without_split_uses_logits_as_features(tmp_path: Path) -> None:
    torch.manual_seed(2)
    plain = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)).eval()
    path = tmp_path / "plain.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # users still ship TorchScript files
        torch.jit.script(plain).save(str(path))
    with pytest.raises(ModelError, match="does not carry its input shape"):
        load_model(str(path))
    with pytest.raises(ModelError, match="gives 10 logits per input, but the dataset has 7"):
        load_model(str(path), input_shape=(1, 28, 28), num_classes=7)
    model = load_model(str(path), input_shape=(1, 28, 28), num_classes=10)
    assert isinstance(model, LogitsAsFeatures) and model.num_classes == 10
    inputs = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model.features(inputs), plain(inputs))
        torch.testing.assert_close(model(inputs), plain(inputs))


def test_factory_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_models.py").write_text(
        "from marginwatch.models.architectures import FashionMnistCNN\n"
        "def build():\n    return FashionMnistCNN()\n"
        "def not_a_model():\n    return 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(3)
    reference = FashionMnistCNN()
    save_weights(reference, tmp_path / "w.safetensors")
    model = load_model("my_models:build", tmp_path / "w.safetensors")
    assert isinstance(model, FashionMnistCNN) and not model.training
    with pytest.raises(ModelError, match=r"not an nn\.Module"):
        load_model("my_models:not_a_model")
    with pytest.raises(ModelError, match="cannot import factory"):
        load_model("my_models:missing")
    sys.modules.pop("my_models", None)


def test_bad_specs_and_weights(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="unknown model 'resnet50'"):
        load_model("resnet50")
    with pytest.raises(ModelError, match="needs a weights file"):
        load_model("fmnist-cnn")
    with pytest.raises(ModelError, match="does not exist"):
        load_model("fmnist-cnn", tmp_path / "nope.safetensors")
    save_weights(PreActResNet18(), tmp_path / "resnet.safetensors")
    with pytest.raises(ModelError, match="do not fit the architecture"):
        load_model("fmnist-cnn", tmp_path / "resnet.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ModelError, match="cannot read weights"):
        load_model("fmnist-cnn", tmp_path / "junk.safetensors")
