"""Resolve a model spec to a loaded `SplitClassifier`.

A spec is one of
- a shipped reference model (`fmnist-cnn-pgd`, `fmnist-cnn-standard`): architecture + weights here;
- an architecture name (`fmnist-cnn`, `preact-resnet18`) with a weights file;
- a TorchScript file (`*.pt`, `*.ts`, `*.torchscript`);
- `package.module:factory` returning an `nn.Module`, with an optional weights file.
"""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from marginwatch.models.architectures import ARCHITECTURES, LogitsAsFeatures, SplitClassifier

WEIGHTS_DIR = Path(__file__).parent / "weights"
SHIPPED_MODELS = {"fmnist-cnn-pgd": "fmnist-cnn", "fmnist-cnn-standard": "fmnist-cnn"}
TORCHSCRIPT_SUFFIXES = (".pt", ".ts", ".torchscript")


class ModelError(Exception):
    """A model spec or weights file that cannot be resolved or loaded."""


def shipped_weights(name: str) -> Path:
    return WEIGHTS_DIR / f"{name}.safetensors"


def save_weights(model: nn.Module, path: Path) -> None:
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, str(path))


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a safetensors file or a plain state dict (`torch.save`, loaded with weights_only)."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
            state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else loaded
    except Exception as error:  # any reader failure means a bad file
        raise ModelError(f"cannot read weights {path}: {error}") from error
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ModelError(f"weights {path} do not fit the architecture: {error}") from error


def _from_factory(spec: str) -> nn.Module:
    module_name, _, attribute = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ModelError(f"cannot import factory {spec!r}: {error}") from error
    model = factory()
    if not isinstance(model, nn.Module):
        raise ModelError(f"factory {spec!r} returned {type(model).__name__}, not an nn.Module")
    return model


def _as_split(
    spec: str,
    model: nn.Module,
    input_shape: tuple[int, int, int] | None,
    num_classes: int | None,
) -> SplitClassifier:
    if isinstance(model, SplitClassifier):
        return model
    if hasattr(model, "features") and hasattr(model, "head") and hasattr(model, "input_shape"):
        return model  # type: ignore[return-value]  # duck-typed split model
    if input_shape is None or num_classes is None:
        # No command line takes the shape and class count: a factory is where they are known.
        raise ModelError(
            f"model {spec!r} has no features()/head() split and no input_shape: make it a "
            "marginwatch.models.architectures.SplitClassifier, or give as the model a "
            "package.module:factory that returns LogitsAsFeatures(model, input_shape, "
            "num_classes) from marginwatch.models.architectures (for a TorchScript file, "
            "torch.jit.load it there), whose logits then serve as features"
        )
    return LogitsAsFeatures(model, input_shape, num_classes)


def load_model(
    spec: str,
    weights: Path | None = None,
    *,
    input_shape: tuple[int, int, int] | None = None,
    num_classes: int | None = None,
) -> SplitClassifier:
    """Resolve and load `spec` (see the module docstring) in eval mode on the CPU."""
    model: nn.Module
    if spec in SHIPPED_MODELS:
        model = ARCHITECTURES[SHIPPED_MODELS[spec]]()
        weights = weights or shipped_weights(spec)
        if not weights.exists():
            raise ModelError(
                f"shipped weights {weights} are missing: train them with `make models`"
            )
    elif spec in ARCHITECTURES:
        if weights is None:
            raise ModelError(f"architecture {spec!r} needs a weights file (--weights)")
        model = ARCHITECTURES[spec]()
    elif spec.endswith(TORCHSCRIPT_SUFFIXES):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # still how many models ship
                model = torch.jit.load(spec, map_location="cpu")
        except (RuntimeError, ValueError) as error:
            raise ModelError(f"cannot load TorchScript file {spec}: {error}") from error
        weights = None
    elif ":" in spec:
        model = _from_factory(spec)
    else:
        known = ", ".join([*SHIPPED_MODELS, *ARCHITECTURES])
        raise ModelError(
            f"unknown model {spec!r}: use one of {known}, a TorchScript file, "
            "or package.module:factory"
        )
    if weights is not None:
        load_weights(model, weights)
    split = _as_split(spec, model, input_shape, num_classes)
    split.eval()
    return split
