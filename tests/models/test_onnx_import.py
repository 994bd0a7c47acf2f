"""The ONNX → torch converter: every supported operator family against ONNX Runtime on graphs
that `torch.onnx.export` writes, a dynamic batch axis kept through a second export, and clear
refusals for what it does not convert."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from marginwatch.models.architectures import FashionMnistCNN, PreActResNet18
from marginwatch.models.export import LogitsAndFeatures, export_onnx, onnx_session
from marginwatch.models.onnx_import import (
    SUPPORTED_OPS,
    OnnxImportError,
    OnnxSplitModule,
    conversion_problems,
    load_onnx,
)


class _ShapeMlp(nn.Module):
    """`view(x.size(0), -1)` (Shape, Gather, Unsqueeze, Concat, Reshape), BatchNorm1d,
    LeakyReLU and a softmax output."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden, self.bn, self.out = nn.Linear(784, 32), nn.BatchNorm1d(32), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.leaky_relu(self.bn(self.hidden(x.view(x.size(0), -1))), 0.2)
        return F.softmax(self.out(hidden), 1)


class _Pools(nn.Module):
    """Asymmetric conv pads, grouped and dilated convs, ReLU6 (Clip), Sigmoid, Tanh, Mul,
    AveragePool without padded counts, MaxPool, ReduceMean, a constant Reshape, Sub."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 5, stride=2, padding=(1, 2))
        self.bn = nn.BatchNorm2d(6)
        self.grouped = nn.Conv2d(6, 6, 3, groups=2, dilation=2, padding=2)
        self.out = nn.Linear(6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.relu6(self.bn(self.conv(x)))
        hidden = torch.sigmoid(self.grouped(hidden)) * torch.tanh(hidden)
        hidden = F.avg_pool2d(hidden, 3, 2, 1, ceil_mode=True, count_include_pad=False)
        hidden = F.max_pool2d(hidden, 3, 1, 1).mean((2, 3))
        return self.out(hidden).reshape(-1, 10) - 0.5


class _Transposed(nn.Module):
    """Transpose, a flatten of middle axes (Shape, Slice, Concat, Reshape), MatMul with a
    weight, Div and Add by constants."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(28, 10) / 28)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.transpose(2, 3).flatten(1, 2)  # N×28×28 with rows and columns swapped
        return (rows @ self.weight).mean(1) / 0.5 + 1.0


def _randomise_batch_norm(model: nn.Module) -> nn.Module:
    # fresh BatchNorm statistics are (0, 1): an identity that a wrong conversion would pass
    for module in model.modules():
        if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _export(model: nn.Module, shape: tuple[int, ...], path: Path, **options: object) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation notes
        torch.onnx.export(
            model,
            (torch.rand(2, *shape),),
            str(path),
            input_names=["x"],
            output_names=["y"],
            dynamic_axes=options.pop("dynamic_axes", {"x": {0: "n"}, "y": {0: "n"}}),  # type: ignore[arg-type]
            opset_version=17,
            dynamo=False,
            **options,  # type: ignore[arg-type]
        )
    return path


BUILDERS: dict[str, tuple[Callable[[], nn.Module], tuple[int, int, int]]] = {
    "fmnist-cnn": (FashionMnistCNN, (1, 28, 28)),
    "preact-resnet18-normalised": (
        lambda: PreActResNet18(mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.25)),
        (3, 32, 32),
    ),
    "shape-mlp": (_ShapeMlp, (1, 28, 28)),
    "pools": (_Pools, (1, 28, 28)),
    "transposed": (_Transposed, (1, 28, 28)),
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_conversion_matches_onnxruntime_and_torch(name: str, tmp_path: Path) -> None:
    build, shape = BUILDERS[name]
    torch.manual_seed(0)
    model = _randomise_batch_norm(build())
    path = _export(model, shape, tmp_path / f"{name}.onnx")
    converted = load_onnx(path)
    inputs = torch.rand(37, *shape)  # a batch size the export never saw
    with torch.no_grad():
        ours = converted(inputs)
        torch.testing.assert_close(ours, model(inputs), atol=1e-5, rtol=1e-4)
    reference = converted.onnxruntime_logits(inputs.numpy())
    np.testing.assert_allclose(ours.numpy(), reference, atol=1e-5, rtol=1e-4)
    assert conversion_problems(converted, inputs) == []
    # gradients flow to the input (what the attacks need)
    probe = inputs[:3].clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(converted(probe).sum(), probe)
    assert gradient.abs().sum() > 0
    # exported again (as the serving graph is), the batch axis stays dynamic
    again = tmp_path / "again.onnx"
    export_onnx(converted, shape, again, ["logits"])
    session = onnx_session(again)
    for batch in (1, 5):
        (logits,) = session.run(["logits"], {"input": inputs[:batch].numpy()})
        np.testing.assert_allclose(logits, reference[:batch], atol=1e-5, rtol=1e-4)


def test_hand_written_graph_of_the_remaining_operators(tmp_path: Path) -> None:
    """Operators torch's exporter rarely writes for these models: Gemm with transB, alpha and
    beta; Unsqueeze and Squeeze with axes inputs; Dropout; Concat; Cast; Identity."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((5, 16)).astype(np.float32)
    bias = rng.standard_normal(5).astype(np.float32)
    nodes = [
        helper.make_node("Flatten", ["x"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "w", "b"], ["g"], transB=1, alpha=0.5, beta=2.0),
        helper.make_node("Unsqueeze", ["g", "axis2"], ["u"]),
        helper.make_node("Squeeze", ["u", "axis2"], ["s"]),
        helper.make_node("Dropout", ["s"], ["d"]),
        helper.make_node("Concat", ["d", "g"], ["c"], axis=1),
        helper.make_node("Cast", ["c"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Identity", ["f"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "remaining",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 10])],
        [
            numpy_helper.from_array(weight, "w"),
            numpy_helper.from_array(bias, "b"),
            numpy_helper.from_array(np.array([2], dtype=np.int64), "axis2"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "remaining.onnx"))
    converted = load_onnx(tmp_path / "remaining.onnx")
    inputs = torch.rand(6, 1, 4, 4)
    expected = 0.5 * inputs.flatten(1).numpy() @ weight.T + 2.0 * bias
    with torch.no_grad():
        np.testing.assert_allclose(
            converted(inputs).numpy(), np.concatenate([expected, expected], 1), rtol=1e-5
        )
    assert conversion_problems(converted, inputs) == []


def test_features_output_gives_a_split_module(tmp_path: Path) -> None:
    torch.manual_seed(2)
    model = FashionMnistCNN().eval()
    path = tmp_path / "split.onnx"
    export_onnx(LogitsAndFeatures(model), (1, 28, 28), path, ["logits", "features"])
    converted = load_onnx(path)
    assert isinstance(converted, OnnxSplitModule)
    inputs = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        features, logits = converted.features_and_logits(inputs)
        torch.testing.assert_close(features, model.features(inputs), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(logits, model(inputs), atol=1e-5, rtol=1e-4)


def test_a_wrong_conversion_is_reported(tmp_path: Path) -> None:
    torch.manual_seed(3)
    converted = load_onnx(_export(FashionMnistCNN().eval(), (1, 28, 28), tmp_path / "m.onnx"))
    bias = next(b for b in converted.buffers() if b.shape == (10,))
    bias += 1.0  # torch side changed, ONNX Runtime still runs the file's weights
    [problem] = conversion_problems(converted, torch.rand(8, 1, 28, 28))
    assert "differs from ONNX Runtime on 8 inputs" in problem


def test_unsupported_operator_is_named(tmp_path: Path) -> None:
    gelu = nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.GELU()).eval()  # GELU → Erf
    path = _export(gelu, (1, 28, 28), tmp_path / "gelu.onnx")
    with pytest.raises(OnnxImportError, match=r"^unsupported ONNX operator Erf \(node") as error:
        load_onnx(path)
    assert "\n" not in str(error.value) and "Conv" in str(error.value)


def test_unsupported_attribute_is_named(tmp_path: Path) -> None:
    torch.manual_seed(4)
    path = _export(FashionMnistCNN().eval(), (1, 28, 28), tmp_path / "m.onnx")
    graph = onnx.load(str(path))
    conv = next(node for node in graph.graph.node if node.op_type == "Conv")
    conv.attribute.append(onnx.helper.make_attribute("auto_pad", "SAME_UPPER"))
    del conv.attribute[[a.name for a in conv.attribute].index("pads")]
    onnx.save(graph, str(path))
    converted = load_onnx(path)
    with pytest.raises(OnnxImportError, match=r"unsupported ONNX Conv .*auto_pad=SAME_UPPER"):
        converted(torch.rand(2, 1, 28, 28))


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(OnnxImportError, match="does not exist"):
        load_onnx(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all")
    with pytest.raises(OnnxImportError, match="cannot read ONNX file"):
        load_onnx(tmp_path / "junk.onnx")
    two = nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).eval()
    path = tmp_path / "two.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _TwoOutputs(two),
            (torch.rand(2, 1, 28, 28),),
            str(path),
            input_names=["x"],
            output_names=["a", "b"],
            dynamo=False,
        )
    with pytest.raises(OnnxImportError, match="name the logits output 'logits'"):
        load_onnx(path)


class _TwoOutputs(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        return logits, logits * 2


def test_supported_list_is_the_documented_one() -> None:
    documented = {
        "Conv", "Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "Relu", "LeakyRelu", "Sigmoid",
        "Tanh", "MaxPool", "AveragePool", "GlobalAveragePool", "BatchNormalization", "Flatten",
        "Reshape", "Transpose", "Concat", "Identity", "Dropout", "Softmax", "Clip", "Constant",
        "Shape", "Gather", "Unsqueeze", "Squeeze", "Slice", "ReduceMean", "Cast",
    }  # fmt: skip
    assert set(SUPPORTED_OPS) == documented
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert all(op in readme for op in documented)
