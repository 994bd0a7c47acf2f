"""Every model format a user may bring, loaded and adapted with facts from the data and a
forward pass: the adapter chosen, the logits unchanged, the features kept where the model has
them; and each way a model file can be wrong refused with one line."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from marginwatch.models.architectures import (
    FashionMnistCNN,
    FeaturesAndForward,
    FeaturesAndHead,
    LogitsAsFeatures,
    Normalized,
    SplitClassifier,
)
from marginwatch.models.registry import ModelError, load_model

FMNIST = (1, 28, 28)


@pytest.fixture(scope="module")
def shipped() -> SplitClassifier:
    return load_model("fmnist-cnn-pgd")


@pytest.mark.parametrize(
    ("name", "adapter", "feature_dim"),
    [
        ("forward.pt", LogitsAsFeatures, 10),
        ("features.pt", FeaturesAndForward, 128),
        ("split.pt", FeaturesAndHead, 128),
        ("program.pt2", LogitsAsFeatures, 10),
        ("model.onnx", LogitsAsFeatures, 10),
    ],
)
def test_model_files_are_adapted_from_a_forward_pass(
    name: str,
    adapter: type[SplitClassifier],
    feature_dim: int,
    model_files: dict[str, Path],
    shipped: SplitClassifier,
) -> None:
    model = load_model(str(model_files[name]), input_shape=FMNIST, num_classes=10)
    assert type(model) is adapter
    assert (model.input_shape, model.num_classes, model.feature_dim) == (FMNIST, 10, feature_dim)
    inputs = torch.rand(5, *FMNIST)
    with torch.no_grad():
        features, logits = model.features_and_logits(inputs)
        torch.testing.assert_close(logits, shipped(inputs), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(model(inputs), logits)
        expected = shipped.features(inputs) if feature_dim == 128 else logits
        torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-4)


def test_head_that_is_not_forward_is_not_used(tmp_path: Path) -> None:
    """forward applies a temperature that head leaves out: the served logits must be forward's."""

    class Tempered(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = FashionMnistCNN()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x) / 2.0

        def features(self, x: torch.Tensor) -> torch.Tensor:
            return self.net.features(x)

        def head(self, features: torch.Tensor) -> torch.Tensor:
            return self.net.head(features)

    torch.manual_seed(0)
    original = Tempered().eval()
    inputs = torch.rand(3, *FMNIST)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace_module(
            original,
            {"forward": inputs, "features": inputs, "head": original.features(inputs)},
        ).save(str(tmp_path / "tempered.pt"))
    model = load_model(str(tmp_path / "tempered.pt"), input_shape=FMNIST)
    assert isinstance(model, FeaturesAndForward)
    with torch.no_grad():
        torch.testing.assert_close(model(inputs), original(inputs), atol=1e-5, rtol=1e-4)


def test_a_features_submodule_is_not_a_features_method(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torchvision-style models name their convolutional trunk `features` (a module giving
    N×C×H×W): its logits serve as features instead."""
    (tmp_path / "vgg_like.py").write_text(
        "from torch import nn\n"
        "def build():\n"
        "    model = nn.Module()\n"
        "    model.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())\n"
        "    model.classifier = nn.Linear(4 * 26 * 26, 10)\n"
        "    model.forward = lambda x: model.classifier(model.features(x).flatten(1))\n"
        "    return model\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert isinstance(load_model("vgg_like:build", input_shape=FMNIST), LogitsAsFeatures)
    finally:
        sys.modules.pop("vgg_like", None)


def test_exported_program_with_a_fixed_batch_is_refused(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(FashionMnistCNN().eval(), (torch.rand(1, *FMNIST),))
        torch.export.save(program, tmp_path / "fixed.pt2")
    with pytest.raises(ModelError, match=r"fixed batch size of 1.*dynamic_shapes"):
        load_model(str(tmp_path / "fixed.pt2"), input_shape=FMNIST)


@pytest.mark.parametrize("name", ["program.pt2", "model.onnx"])
def test_declared_input_must_fit_the_data(name: str, model_files: dict[str, Path]) -> None:
    with pytest.raises(ModelError, match=r"takes inputs of shape N×1×28×28, .* N×3×32×32"):
        load_model(str(model_files[name]), input_shape=(3, 32, 32))


def test_model_file_mistakes(tmp_path: Path, model_files: dict[str, Path]) -> None:
    torch.save(FashionMnistCNN().state_dict(), tmp_path / "state.pt")
    with pytest.raises(ModelError, match=r"is a torch\.save file .* as --weights"):
        load_model(str(tmp_path / "state.pt"), input_shape=FMNIST)
    with pytest.raises(ModelError, match="does not exist"):
        load_model(str(tmp_path / "missing.pt"), input_shape=FMNIST)
    with pytest.raises(ModelError, match="carries its own weights"):
        load_model(str(model_files["forward.pt"]), tmp_path / "state.pt", input_shape=FMNIST)
    with pytest.raises(ModelError, match="gives 10 logits per input, but the dataset has 3"):
        load_model(str(model_files["split.pt"]), input_shape=FMNIST, num_classes=3)
    with pytest.raises(ModelError, match=r"fails on a batch of shape 2×3×32×32: RuntimeError"):
        load_model(str(model_files["forward.pt"]), input_shape=(3, 32, 32))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("os:system", r"^factory 'os:system' failed: TypeError: "),
        ("os:sep", r"^factory 'os:sep' is a str, not a callable$"),
        ("no_such_module_here:build", r"^cannot import factory .*ModuleNotFoundError"),
        ("os:no_such_function", r"^cannot import factory .*AttributeError"),
    ],
)
def test_factory_failures_are_one_line(spec: str, message: str) -> None:
    with pytest.raises(ModelError, match=message) as error:
        load_model(spec)
    assert "\n" not in str(error.value)


def test_normalized_sees_zero_one_inputs() -> None:
    """A model trained on ((255·x − mean) / std) gives, behind `Normalized`, on x in [0, 1] the
    logits the plain model gives on x."""

    class ExpectsNormalised(SplitClassifier):
        def __init__(self, inner: FashionMnistCNN, mean: float, std: float) -> None:
            super().__init__()
            self.inner, self.mean, self.std = inner, mean, std
            self.input_shape, self.num_classes, self.feature_dim = FMNIST, 10, 128

        def features(self, z: torch.Tensor) -> torch.Tensor:
            return self.inner.features((z * self.std + self.mean) / 255.0)

        def head(self, features: torch.Tensor) -> torch.Tensor:
            return self.inner.head(features)

    torch.manual_seed(1)
    inner = FashionMnistCNN().eval()
    model = Normalized(
        ExpectsNormalised(inner, 72.9, 90.0), input_range=(0.0, 255.0), mean=(72.9,), std=(90.0,)
    )
    inputs = torch.rand(4, *FMNIST)
    with torch.no_grad():
        torch.testing.assert_close(model(inputs), inner(inputs), atol=1e-5, rtol=1e-4)
        features, logits = model.features_and_logits(inputs)
        torch.testing.assert_close(features, inner.features(inputs), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(logits, inner(inputs), atol=1e-5, rtol=1e-4)
    # the map is state (the calibration's cache key covers it)
    assert {"scale", "shift"} <= set(model.state_dict())
    with pytest.raises(ValueError, match="mean has 3 values for a model with 1-channel inputs"):
        Normalized(inner, input_range=(0.0, 1.0), mean=(0.5, 0.5, 0.5), std=(1.0,))
