"""Run an ONNX classifier with torch operations, so that the attacks get gradients.

ONNX Runtime has no gradients, and the maintained converter (onnx2torch) imports torchvision,
which cannot be installed beside the torch build used here. This module converts the operators
that `torch.onnx.export` writes for common CNNs and MLPs (`onnx_ops.SUPPORTED_OPS`: Conv, Gemm,
MatMul, Add, Sub, Mul, Div, Relu, LeakyRelu, Sigmoid, Tanh, MaxPool, AveragePool,
GlobalAveragePool, BatchNormalization, Flatten, Reshape, Transpose, Concat, Identity, Dropout,
Softmax, Clip, Constant, Shape, Gather, Unsqueeze, Squeeze, Slice, ReduceMean, Cast), and
nothing else: a graph with any other operator is refused at load time with `OnnxImportError`,
one line naming it. The converted module is checked against ONNX Runtime on real inputs before
it is trusted (`conversion_problems`): the job does that on the calibration subset before any
attack. It stays traceable with a dynamic batch axis, because the calibration job exports it
again (with its score head) as the serving graph.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from marginwatch.models.onnx_ops import OPS, SUPPORTED_OPS, Node, OnnxImportError

if TYPE_CHECKING:
    import onnx

# `onnx` is imported where a graph is read, not here: the registry imports this module for
# every model spec, and onnx costs about 1.5 s of start-up (most of the preflight's budget).

LOGITS_OUTPUT = "logits"  # the output read as logits when a graph has several
FEATURES_OUTPUT = "features"  # read as penultimate features when present (marginwatch-export)
ONNX_SUFFIXES = (".onnx",)
__all__ = [
    "SUPPORTED_OPS",
    "OnnxImportError",
    "OnnxModule",
    "OnnxSplitModule",
    "conversion_problems",
    "load_onnx",
]


def _attribute(attribute: onnx.AttributeProto) -> Any:
    import onnx

    value = onnx.helper.get_attribute_value(attribute)
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, onnx.TensorProto):
        return onnx.numpy_helper.to_array(value)
    return value


def _constant_value(node: onnx.NodeProto) -> np.ndarray:
    attrs = {a.name: _attribute(a) for a in node.attribute}
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if key in attrs:
            dtype = np.float32 if key.startswith("value_float") else None
            return np.asarray(attrs[key], dtype=dtype if key != "value" else None)
    raise OnnxImportError(f"unsupported ONNX Constant (node {node.name!r}): attributes {attrs}")


def _to_tensor(array: np.ndarray) -> Tensor:
    if array.dtype == np.float64:
        array = array.astype(np.float32)  # the input is float32; keep every float in it
    return torch.from_numpy(np.array(array, copy=True))


class OnnxModule(nn.Module):
    """An ONNX graph evaluated node by node with torch: `forward(x)` is its logits output.

    Initializers and Constant nodes become buffers (persistent, so the state dict, and with it
    the calibration's cache key, covers the weights)."""

    def __init__(self, model: onnx.ModelProto, source: str = "<onnx>") -> None:
        super().__init__()
        self.source = source
        self._bytes = model.SerializeToString()  # for the check against ONNX Runtime
        graph = model.graph
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
        from onnx.numpy_helper import to_array

        constants = {init.name: to_array(init) for init in graph.initializer}
        self.nodes: list[Node] = []
        for proto in graph.node:
            if proto.op_type == "Constant":
                constants[proto.output[0]] = _constant_value(proto)
                continue
            self.nodes.append(self._node(proto, constants, opset))
        inputs = [value for value in graph.input if value.name not in constants]
        if len(inputs) != 1:
            raise OnnxImportError(
                f"{source} has {len(inputs)} graph inputs; a classifier takes one image batch"
            )
        self.input_name = inputs[0].name
        self.input_dims = _dims(inputs[0])
        outputs = [value.name for value in graph.output]
        self.logits_name = _logits_output(outputs, source)
        self._buffer_names: dict[str, str] = {}
        for index, (name, array) in enumerate(constants.items()):
            self._buffer_names[name] = f"onnx_{index}"
            self.register_buffer(f"onnx_{index}", _to_tensor(array))

    @staticmethod
    def _node(proto: onnx.NodeProto, constants: dict[str, np.ndarray], opset: int) -> Node:
        if proto.domain not in ("", "ai.onnx") or proto.op_type not in OPS:
            raise OnnxImportError(
                f"unsupported ONNX operator {proto.op_type} (node {proto.name!r}); supported: "
                + ", ".join(SUPPORTED_OPS)
            )
        node = Node(
            op=proto.op_type,
            name=proto.name,
            inputs=tuple(proto.input),
            outputs=tuple(proto.output),
            attrs={a.name: _attribute(a) for a in proto.attribute},
            constants={i: constants[n] for i, n in enumerate(proto.input) if n in constants},
            opset=opset,
        )
        if node.op == "Dropout" and len(node.outputs) > 1 and node.outputs[1]:
            raise node.refuse("its mask output is used")
        return node

    def run(self, inputs: Tensor) -> dict[str, Tensor]:
        """Every value of the graph on `inputs`."""
        values: dict[str, Tensor] = {
            name: getattr(self, attr) for name, attr in self._buffer_names.items()
        }
        values[self.input_name] = inputs
        for node in self.nodes:
            args = [values[name] if name else None for name in node.inputs]
            values[node.outputs[0]] = OPS[node.op](node, args)
        return values

    def forward(self, inputs: Tensor) -> Tensor:
        return self.run(inputs)[self.logits_name]

    def onnxruntime_logits(self, inputs: np.ndarray) -> np.ndarray:
        """The original graph's logits under ONNX Runtime (CPU), the conversion's reference."""
        import onnxruntime as ort

        session = ort.InferenceSession(self._bytes, providers=["CPUExecutionProvider"])
        parts = [
            session.run([self.logits_name], {self.input_name: inputs[start : start + 256]})[0]
            for start in range(0, len(inputs), 256)
        ]
        return np.concatenate(parts)


class OnnxSplitModule(OnnxModule):
    """A graph that also outputs its penultimate `features` (as `marginwatch-export` writes):
    the features reach the pseudo-margin, and one run gives both."""

    def features_and_logits(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        values = self.run(inputs)
        return values[FEATURES_OUTPUT], values[self.logits_name]

    def features(self, inputs: Tensor) -> Tensor:
        return self.features_and_logits(inputs)[0]


def _dims(value: onnx.ValueInfoProto) -> list[int | None]:
    """The input's dimensions, None where symbolic (a dynamic axis) or absent."""
    shape = value.type.tensor_type.shape
    return [dim.dim_value if dim.HasField("dim_value") else None for dim in shape.dim]


def _logits_output(outputs: list[str], source: str) -> str:
    if LOGITS_OUTPUT in outputs:
        return LOGITS_OUTPUT
    if len(outputs) == 1:
        return outputs[0]
    raise OnnxImportError(
        f"{source} has outputs {outputs}: name the logits output {LOGITS_OUTPUT!r} "
        "(and penultimate features, if any, 'features')"
    )


def load_onnx(path: Path) -> OnnxModule:
    """Read and convert `path`; `OnnxImportError` if it cannot be, with the reason in one line.
    Its declared input (`input_dims`) is checked against the data by the caller."""
    import onnx

    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except FileNotFoundError as error:
        raise OnnxImportError(f"ONNX file {path} does not exist") from error
    except Exception as error:  # onnx raises DecodeError, ValidationError, ... for a bad file
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else "unreadable"
        raise OnnxImportError(f"cannot read ONNX file {path}: {first_line}") from error
    outputs = {value.name for value in model.graph.output}
    kind = OnnxSplitModule if FEATURES_OUTPUT in outputs else OnnxModule
    return kind(model, str(path))


@torch.no_grad()
def conversion_problems(
    model: nn.Module, inputs: Tensor, *, tolerance: float = 1e-4, batch_size: int = 256
) -> list[str]:
    """Compare every `OnnxModule` inside `model` with ONNX Runtime on what it receives while
    `model` runs on `inputs` (so any normalisation wrapped around it is applied first): logits
    within `tolerance` × max(1, largest |logit|), and the same top-1 label. Empty: it matches."""
    modules = [module for module in model.modules() if isinstance(module, OnnxModule)]
    if not modules:
        return []
    seen: dict[int, list[Tensor]] = {id(module): [] for module in modules}
    handles = [
        module.register_forward_pre_hook(
            lambda module, args: seen[id(module)].append(args[0].detach().cpu())
        )
        for module in modules
    ]
    try:
        for start in range(0, len(inputs), batch_size):
            model(inputs[start : start + batch_size])
    finally:
        for handle in handles:
            handle.remove()
    problems = []
    for module in modules:
        received = torch.cat(seen[id(module)]).float()
        ours = torch.cat([module(part) for part in received.split(batch_size)]).cpu().numpy()
        reference = module.onnxruntime_logits(received.numpy())
        allowed = tolerance * max(1.0, float(np.abs(reference).max()))
        worst = float(np.abs(ours - reference).max())
        flips = int((ours.argmax(1) != reference.argmax(1)).sum())
        if worst > allowed or flips:
            problems.append(
                f"the torch conversion of {module.source} differs from ONNX Runtime on "
                f"{len(received)} inputs: max |Δlogit| {worst:.2e} (allowed {allowed:.1e}), "
                f"{flips} labels differ"
            )
    return problems
