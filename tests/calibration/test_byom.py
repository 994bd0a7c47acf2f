"""Bring your own model, end to end: each model format goes from a file on disk through
`marginwatch-calibrate` to a published version that the service's engine loads and predicts
with. The files hold the shipped `fmnist-cnn-pgd`, so the served logits must be its logits."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from marginwatch.artifact.schema import ONNX_FILE, CalibrationRecord
from marginwatch.calibration.__main__ import main
from marginwatch.models.architectures import SplitClassifier
from marginwatch.models.data import FASHION_MNIST_CLASSES, Dataset, save_npz
from marginwatch.models.registry import load_model, shipped_weights
from marginwatch.service.engine import EngineOptions, Prediction, ServedModel

# Small budgets: these tests prove the chain, not the figures (docs/benchmarks.md has those).
FAST = ["--subset-size", "20", "--attack", "fmn:10", "--attack", "fab:5", "--bootstrap", "20",
        "--quiet", "--version", "v1"]  # fmt: skip
NEVER = ["--pseudo-margin", "never"]


@pytest.fixture(scope="module")
def data_npz(tmp_path_factory: pytest.TempPathFactory, fashion_subset: Dataset) -> Path:
    path = tmp_path_factory.mktemp("data") / "fmnist-200.npz"
    save_npz(fashion_subset.subset(np.arange(0, 2000, 10)), path)
    return path


@pytest.fixture(scope="module")
def shipped() -> SplitClassifier:
    return load_model("fmnist-cnn-pgd")


@pytest.fixture
def factories(tmp_path: Path, model_files: dict[str, Path]) -> Iterator[str]:
    """A user's module with factories around a TorchScript file: the case whose serving-graph
    export failed after every attack ("not part of the active trace")."""
    (tmp_path / "user_factories.py").write_text(
        "import warnings\n"
        "import torch\n"
        "from marginwatch.models.architectures import LogitsAsFeatures\n"
        f"PATH = {str(model_files['forward.pt'])!r}\n"
        "def plain():\n"
        "    with warnings.catch_warnings():\n"
        "        warnings.simplefilter('ignore', DeprecationWarning)\n"
        "        return torch.jit.load(PATH)\n"
        "def wrapped():\n"
        "    return LogitsAsFeatures(plain(), (1, 28, 28), 10)\n"
        "class Duck(torch.nn.Module):  # split by duck typing: no class of ours\n"
        "    input_shape = (1, 28, 28)\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.trunk = plain()\n"
        "    def features(self, x):\n"
        "        return self.trunk(x) * 2.0\n"
        "    def head(self, f):\n"
        "        return f / 2.0\n"
        "    def forward(self, x):\n"
        "        return self.head(self.features(x))\n"
        "def duck():\n"
        "    return Duck()\n"
        "class Plain(torch.nn.Module):  # forward only\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.trunk = plain()\n"
        "    def forward(self, x):\n"
        "        return self.trunk(x)\n"
        "def module():\n"
        "    return Plain()\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        yield "user_factories"
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("user_factories", None)


def calibrate_and_serve(
    store: Path, spec: str, data: Path, inputs: np.ndarray, *extra: str
) -> tuple[CalibrationRecord, Prediction]:
    assert main(["--model", spec, "--name", "mine", "--store", str(store),
                 "--dataset", str(data), *FAST, *extra]) == 0  # fmt: skip
    served = ServedModel("mine", store / "mine" / "v1", EngineOptions(intra_op_threads=1))
    served.load()
    return served.record, served.predict(inputs)


def _check_served(
    record: CalibrationRecord, prediction: Prediction, inputs: np.ndarray, shipped: SplitClassifier
) -> None:
    with torch.no_grad():
        expected = shipped(torch.from_numpy(inputs)).numpy()
    np.testing.assert_allclose(prediction.logits, expected, atol=1e-4)
    assert (prediction.labels == expected.argmax(1)).all()
    assert (prediction.brittle == (prediction.scores < record.threshold)).all()
    assert record.input_shape == [1, 28, 28]
    assert record.class_names == list(FASHION_MNIST_CLASSES)


@pytest.mark.slow
@pytest.mark.parametrize(
    "spec",
    ["forward.pt", "split.pt", "program.pt2", "model.onnx", "factory:wrapped", "factory:plain",
     "factory:duck", "factory:module", "architecture"],
)  # fmt: skip
def test_each_format_is_calibrated_published_and_served(
    spec: str,
    *,
    tmp_path: Path,
    data_npz: Path,
    fashion_subset: Dataset,
    model_files: dict[str, Path],
    factories: str,
    shipped: SplitClassifier,
) -> None:
    extra: list[str] = []
    if spec.startswith("factory:"):
        spec = f"{factories}:{spec.split(':')[1]}"
    elif spec == "architecture":
        spec, extra = "fmnist-cnn", ["--weights", str(shipped_weights("fmnist-cnn-pgd"))]
    else:
        spec = str(model_files[spec])
    inputs = fashion_subset.float_images[1000:1032]
    record, prediction = calibrate_and_serve(tmp_path, spec, data_npz, inputs, *NEVER, *extra)
    _check_served(record, prediction, inputs, shipped)
    assert record.score_kind == "logit-margin"


@pytest.mark.slow
def test_features_without_head_reach_the_pseudo_margin(
    *,
    tmp_path: Path,
    data_npz: Path,
    fashion_subset: Dataset,
    model_files: dict[str, Path],
    shipped: SplitClassifier,
) -> None:
    inputs = fashion_subset.float_images[1000:1032]
    record, prediction = calibrate_and_serve(
        tmp_path, str(model_files["features.pt"]), data_npz, inputs,
        "--pseudo-margin", "always", "--pseudo-input", "features", "--pseudo-train-size", "50",
        "--pseudo-epochs", "10", "--pseudo-hidden", "16",
    )  # fmt: skip
    _check_served(record, prediction, inputs, shipped)  # the logits are its forward's
    assert record.score_kind == "pseudo-margin" and record.pseudo_margin is not None
    assert record.pseudo_margin.score_input == "features"
    # the MLP's first layer reads the 128 penultimate features, not the 10 logits
    graph = onnx.load(str(tmp_path / "mine" / "v1" / ONNX_FILE))
    shapes = {tuple(numpy_helper.to_array(init).shape) for init in graph.graph.initializer}
    assert (16, 128) in shapes or (128, 16) in shapes


@pytest.mark.slow
def test_a_model_that_expects_normalised_inputs_is_served_zero_one_inputs(
    tmp_path: Path, data_npz: Path, fashion_subset: Dataset, shipped: SplitClassifier
) -> None:
    """The model was trained on (255·x − 72.9) / 90: with --input-range, --mean and --std the
    attacks and the served graph take x in [0, 1] and give the plain model's logits."""

    class ExpectsNormalised(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return self.inner((z * 90.0 + 72.9) / 255.0)

    example = torch.rand(2, 1, 28, 28)
    path = tmp_path / "normalised.pt"
    with pytest.warns(DeprecationWarning):  # TorchScript is deprecated, and still shipped
        torch.jit.trace(ExpectsNormalised(shipped), example).save(str(path))
    inputs = fashion_subset.float_images[1000:1032]
    normalise = ["--input-range", "0,255", "--mean", "72.9", "--std", "90"]
    record, prediction = calibrate_and_serve(
        tmp_path / "store", str(path), data_npz, inputs, *NEVER, *normalise
    )
    _check_served(record, prediction, inputs, shipped)
    # the threat model stays in [0, 1] pixel units
    assert record.threat_model.eps == 0.1
