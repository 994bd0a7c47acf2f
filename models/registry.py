"""Resolve a model spec to a loaded `SplitClassifier`.

A spec is one of
- a shipped reference model (`fmnist-cnn-pgd`, `fmnist-cnn-standard`): architecture + weights here;
- an architecture name (`fmnist-cnn`, `preact-resnet18`) with a weights file;
- a model file: TorchScript (`torch.jit.save`) or an ExportedProgram (`torch.export.save`), told
  apart by their contents (`*.pt`, `*.pt2`, `*.ts`, `*.torchscript`), or ONNX (`*.onnx`,
  converted to torch for the attacks by `onnx_import`);
- `package.module:factory` returning an `nn.Module`, with an optional weights file.

A model that is no `SplitClassifier` is adapted (`adapt`): its input shape is the dataset's, its
class count and feature width come from a forward pass, and `features()` (with `head()` where
it has one) is used where it exists. Every failure is a `ModelError` with a one-line message.
"""

from __future__ import annotations

import importlib
import warnings
import zipfile
from pathlib import Path
from typing import cast

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from marginwatch.models.architectures import (
    ARCHITECTURES,
    FeaturesAndForward,
    FeaturesAndHead,
    LogitsAsFeatures,
    SplitClassifier,
)
from marginwatch.models.onnx_import import ONNX_SUFFIXES, OnnxImportError, load_onnx

WEIGHTS_DIR = Path(__file__).parent / "weights"
SHIPPED_MODELS = {"fmnist-cnn-pgd": "fmnist-cnn", "fmnist-cnn-standard": "fmnist-cnn"}
# TorchScript and ExportedProgram files are both zip archives, told apart by their members.
TORCH_FILE_SUFFIXES = (".pt", ".pt2", ".ts", ".torchscript")
MODEL_FILE_SUFFIXES = (*TORCH_FILE_SUFFIXES, *ONNX_SUFFIXES)


class ModelError(Exception):
    """A model spec or weights file that cannot be resolved or loaded."""


def shipped_weights(name: str) -> Path:
    return WEIGHTS_DIR / f"{name}.safetensors"


def save_weights(model: nn.Module, path: Path) -> None:
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, str(path))


def image_shape(images: np.ndarray) -> tuple[int, int, int]:
    """C×H×W of an N×C×H×W batch: the input shape a model without its own takes."""
    _, channels, height, width = images.shape
    return int(channels), int(height), int(width)


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
    except Exception as error:  # the user's module runs on import: any exception is theirs
        raise ModelError(f"cannot import factory {spec!r}: {_one_line(error)}") from error
    if not callable(factory):
        raise ModelError(f"factory {spec!r} is a {type(factory).__name__}, not a callable")
    try:
        model = factory()
    except Exception as error:
        raise ModelError(f"factory {spec!r} failed: {_one_line(error)}") from error
    if not isinstance(model, nn.Module):
        raise ModelError(f"factory {spec!r} returned {type(model).__name__}, not an nn.Module")
    return model


def _one_line(error: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


class ExportedProgramModule(nn.Module):
    """`torch.export.load(path).module()` as a module that sits inside others: that graph
    module refuses `train()`/`eval()` (its mode was fixed when it was exported), and both
    recurse from any parent, so this wrapper keeps them from reaching it. `input_dims`: the
    shape it was exported for, None on a dynamic axis."""

    def __init__(self, program: torch.export.ExportedProgram) -> None:
        super().__init__()
        self.program = program.module()
        user_inputs = set(program.graph_signature.user_inputs)
        placeholders = [
            node
            for node in program.graph.nodes
            if node.op == "placeholder" and node.name in user_inputs
        ]
        if len(placeholders) != 1:
            raise ModelError(f"the program takes {len(placeholders)} inputs; a classifier, one")
        example = placeholders[0].meta.get("val")
        shape = [] if example is None else list(example.shape)
        self.input_dims = [size if isinstance(size, int) else None for size in shape]

    def train(self, mode: bool = True) -> ExportedProgramModule:
        self.training = mode
        return self

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.program(inputs))


def _archive_kind(path: Path) -> str:
    """What a torch zip archive holds, from its member names: "torchscript", "exported"
    (torch.export.save), or "pickle" (torch.save of a state dict or a whole model)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile) as error:
        raise ModelError(f"cannot read model file {path}: {_one_line(error)}") from error
    if any(name.endswith("/archive_format") for name in names):
        return "exported"
    if any("/code/__torch__/" in name or name.endswith("/constants.pkl") for name in names):
        return "torchscript"
    return "pickle"


def _from_torch_file(path: Path) -> nn.Module:
    if not path.exists():
        raise ModelError(f"model file {path} does not exist")
    kind = _archive_kind(path)
    if kind == "pickle":
        raise ModelError(
            f"{path} is a torch.save file (a state dict or a pickled model), not TorchScript or "
            "an ExportedProgram: pass its architecture or a package.module:factory as --model "
            "and the file as --weights"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # still how many models ship
            warnings.simplefilter("ignore", FutureWarning)
            loaded = (
                torch.export.load(path)
                if kind == "exported"
                else torch.jit.load(path, map_location="cpu")
            )
    except Exception as error:  # torch's readers raise RuntimeError, ValueError, KeyError, ...
        raise ModelError(f"cannot load {path}: {_one_line(error)}") from error
    if isinstance(loaded, torch.export.ExportedProgram):
        return ExportedProgramModule(loaded)
    return cast(nn.Module, loaded)


def _is_method(module: nn.Module, name: str) -> bool:
    """`name` is a method of `module` (a TorchScript module's exported method counts), not a
    submodule: torchvision-style models call their convolutional trunk `features`."""
    attribute = getattr(module, name, None)
    return callable(attribute) and not isinstance(attribute, nn.Module)


def _probe(module: nn.Module, inputs: torch.Tensor, spec: str, method: str) -> torch.Tensor:
    """`module.method(inputs)` as a 2-d float tensor, or a `ModelError` saying why not."""
    shape = "×".join(str(size) for size in inputs.shape)
    try:
        with torch.no_grad():
            out = module(inputs) if method == "forward" else getattr(module, method)(inputs)
    except Exception as error:
        raise ModelError(
            f"model {spec!r} fails on a batch of shape {shape}: {_one_line(error)}"
        ) from error
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or not out.is_floating_point():
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(
            f"model {spec!r}: {method}() on a batch of shape {shape} returns {got}; "
            "expected float N×K (one logit per class for forward)"
        )
    return out


def adapt(spec: str, module: nn.Module, input_shape: tuple[int, int, int]) -> SplitClassifier:
    """A `SplitClassifier` around a model that is none, with its class count and feature width
    read off a forward pass on `input_shape` (the dataset's): `features()` reaches the
    pseudo-margin where the model has it (with `head()` when head(features) is its forward),
    else its logits serve as features."""
    module.eval()
    probe = torch.rand(2, *input_shape, generator=torch.Generator().manual_seed(0))
    logits = _probe(module, probe, spec, "forward")
    num_classes = logits.shape[1]
    if num_classes < 2:
        raise ModelError(
            f"model {spec!r} gives {num_classes} logit per input; a classifier gives one per class"
        )
    if not _is_method(module, "features"):
        return LogitsAsFeatures(module, input_shape, num_classes)
    features = _probe(module, probe, spec, "features")
    if _head_gives_forward(module, features, logits):
        return FeaturesAndHead(module, input_shape, num_classes, features.shape[1])
    return FeaturesAndForward(module, input_shape, num_classes, features.shape[1])


def _head_gives_forward(module: nn.Module, features: torch.Tensor, logits: torch.Tensor) -> bool:
    """Whether `module.head(features)` exists and equals its forward's logits: only then may
    head stand in for forward (the served logits are forward's either way)."""
    if not _is_method(module, "head"):
        return False
    try:
        with torch.no_grad():
            from_head = module.head(features)  # type: ignore[operator]
    except Exception:  # a head that does not take these features: serve forward instead
        return False
    return (
        isinstance(from_head, torch.Tensor)
        and from_head.shape == logits.shape
        and torch.allclose(from_head, logits, atol=1e-5)
    )


def _check_declared_input(
    spec: str, module: nn.Module, input_shape: tuple[int, int, int] | None
) -> None:
    """A model file that declares its input (ONNX, ExportedProgram: `input_dims`, None on a
    dynamic axis) must take a batch of any size of the dataset's images."""
    dims: list[int | None] = getattr(module, "input_dims", [])
    if not dims:
        return
    if dims[0] is not None:
        fix = (
            "torch.onnx.export(..., dynamic_axes={'input': {0: 'batch'}})"
            if spec.endswith(ONNX_SUFFIXES)
            else "torch.export.export(..., dynamic_shapes={'x': {0: torch.export.Dim('batch')}})"
        )
        raise ModelError(
            f"{spec} was exported for a fixed batch size of {dims[0]}; the attacks and the "
            f"service need any batch size: export it again with {fix}"
        )
    expected = [None, *input_shape] if input_shape is not None else None
    if expected is not None and (
        len(dims) != len(expected)
        or any(d is not None and d != e for d, e in zip(dims, expected, strict=True))
    ):
        shown = "×".join("N" if d is None else str(d) for d in dims)
        raise ModelError(
            f"{spec} takes inputs of shape {shown}, but the dataset's images are "
            f"N×{'×'.join(map(str, expected[1:]))}"
        )


def _from_file(spec: str, input_shape: tuple[int, int, int] | None) -> nn.Module:
    path = Path(spec)
    module: nn.Module
    if path.suffix in ONNX_SUFFIXES:
        try:
            module = load_onnx(path)
        except OnnxImportError as error:
            raise ModelError(str(error)) from error
    else:
        module = _from_torch_file(path)
    _check_declared_input(spec, module, input_shape)
    return module


def load_model(
    spec: str,
    weights: Path | None = None,
    *,
    input_shape: tuple[int, int, int] | None = None,
    num_classes: int | None = None,
) -> SplitClassifier:
    """Resolve and load `spec` (see the module docstring) in eval mode on the CPU.

    `input_shape` (C×H×W, the dataset's) adapts a model that does not carry its own; with
    `num_classes` (the dataset's) a model that gives another count of logits is refused."""
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
    elif spec.endswith(MODEL_FILE_SUFFIXES):
        if weights is not None:
            raise ModelError(
                f"{spec} carries its own weights: --weights is for an architecture or a factory"
            )
        model = _from_file(spec, input_shape)
    elif ":" in spec:
        model = _from_factory(spec)
    else:
        known = ", ".join([*SHIPPED_MODELS, *ARCHITECTURES])
        raise ModelError(
            f"unknown model {spec!r}: use one of {known}, a model file "
            f"({', '.join(MODEL_FILE_SUFFIXES)}), or package.module:factory"
        )
    if weights is not None:
        load_weights(model, weights)
    split = _as_split(spec, model, input_shape)
    split.eval()
    given = getattr(split, "num_classes", None)  # a duck-typed split model may not say
    if num_classes is not None and given is not None and given != num_classes:
        raise ModelError(
            f"model {spec!r} gives {given} logits per input, but the dataset has "
            f"{num_classes} classes"
        )
    return split


def _as_split(
    spec: str, model: nn.Module, input_shape: tuple[int, int, int] | None
) -> SplitClassifier:
    if isinstance(model, SplitClassifier):
        return model
    declared = getattr(model, "input_shape", None)
    if declared is not None:
        # A model that states its input shape is adapted to it, not to the dataset's: a
        # mismatch is then reported by the caller, naming both shapes.
        try:
            declared_shape = tuple(int(size) for size in declared)
        except (TypeError, ValueError) as error:
            raise ModelError(
                f"model {spec!r}: input_shape {declared!r} is not C×H×W (three integers)"
            ) from error
        if len(declared_shape) != 3:
            raise ModelError(f"model {spec!r}: input_shape {declared!r} is not C×H×W")
        return adapt(spec, model, declared_shape)  # type: ignore[arg-type]
    if input_shape is None:
        raise ModelError(
            f"model {spec!r} does not carry its input shape: load it with the dataset's "
            "(load_model(..., input_shape=(C, H, W)); the command lines do)"
        )
    return adapt(spec, model, input_shape)
