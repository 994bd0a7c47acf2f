"""Shared fixtures: the shipped test subset and small, fast helpers."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from marginwatch.models.data import Dataset, load_dataset


@pytest.fixture(scope="session")
def fashion_subset() -> Dataset:
    return load_dataset("fashion-mnist-subset", "test")


@pytest.fixture(scope="session")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The shipped `fmnist-cnn-pgd` saved in each model-file format a user may bring: TorchScript
    with only `forward`, with `features` too, with `features` and `head`; a `torch.export`
    ExportedProgram (dynamic batch axis); ONNX (one output, dynamic batch axis)."""
    import torch

    from marginwatch.models.registry import load_model

    folder = tmp_path_factory.mktemp("model-files")
    model = load_model("fmnist-cnn-pgd")
    example = torch.rand(2, 1, 28, 28)
    features = model.features(example)
    files = {
        name: folder / name
        for name in ("forward.pt", "features.pt", "split.pt", "program.pt2", "model.onnx")
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's and the ONNX exporter's deprecations
        torch.jit.trace(model, example).save(str(files["forward.pt"]))
        methods = {"forward": example, "features": example}
        torch.jit.trace_module(model, methods).save(str(files["features.pt"]))
        torch.jit.trace_module(model, {**methods, "head": features}).save(str(files["split.pt"]))
        batch = torch.export.Dim("batch")
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
        torch.export.save(program, files["program.pt2"])
        torch.onnx.export(
            model,
            (example,),
            str(files["model.onnx"]),
            input_names=["image"],
            output_names=["scores"],
            dynamic_axes={"image": {0: "n"}, "scores": {0: "n"}},
            dynamo=False,
        )
    return files
