"""The operators `onnx_import` converts: one function per ONNX operator (or family), each
turning a node's inputs into torch values with the operator's semantics at the opsets
`torch.onnx.export` writes (11 to 17 and later). An attribute outside what a function handles
raises `OnnxImportError` naming the node, never a silent approximation.

Kept traceable with a dynamic batch axis: shapes flow through `_shape_as_tensor` and
`_reshape_from_tensor`, and a constant `Reshape` target keeps `0` (copy this axis) as a traced
size rather than a number.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


class OnnxImportError(Exception):
    """An ONNX file that cannot be converted: unreadable, unsupported operator or attribute."""


@dataclass(frozen=True)
class Node:
    """One ONNX node: its operator, value names, attributes, and its inputs known at load time."""

    op: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict[str, Any]
    constants: dict[int, np.ndarray] = field(default_factory=dict)
    opset: int = 17

    def ints(self, key: str, default: Sequence[int] = ()) -> list[int]:
        return [int(value) for value in self.attrs.get(key, default)]

    def constant_ints(self, index: int) -> list[int] | None:
        """Input `index` as Python ints when it is a constant (an initializer or Constant)."""
        value = self.constants.get(index)
        return None if value is None else [int(item) for item in value.reshape(-1)]

    def refuse(self, detail: str) -> OnnxImportError:
        return OnnxImportError(f"unsupported ONNX {self.op} (node {self.name!r}): {detail}")


Op = Callable[[Node, list[Tensor | None]], Tensor]


def _spatial_padding(node: Node, rank: int) -> tuple[list[int], list[int]]:
    """ONNX pads `[x1_begin, x2_begin, …, x1_end, x2_end, …]` as (begins, ends)."""
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "VALID"):
        raise node.refuse(f"auto_pad={auto_pad} (re-export with explicit pads)")
    pads = node.ints("pads", [0] * 2 * rank) if auto_pad == "NOTSET" else [0] * 2 * rank
    return pads[:rank], pads[rank:]


def _torch_pad(begins: list[int], ends: list[int]) -> list[int]:
    """F.pad's order: last axis first, (begin, end) per axis."""
    return [value for pair in zip(reversed(begins), reversed(ends), strict=True) for value in pair]


def _conv(node: Node, args: list[Tensor | None]) -> Tensor:
    inputs, weight = _arg(node, args, 0), _arg(node, args, 1)
    bias = args[2] if len(args) > 2 else None
    rank = weight.dim() - 2
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}.get(rank)
    if conv is None:
        raise node.refuse(f"{rank}-d convolution")
    begins, ends = _spatial_padding(node, rank)
    if begins != ends:
        inputs, begins = F.pad(inputs, _torch_pad(begins, ends)), [0] * rank
    return conv(
        inputs,
        weight,
        bias,
        stride=node.ints("strides", [1] * rank),
        padding=begins,
        dilation=node.ints("dilations", [1] * rank),
        groups=int(node.attrs.get("group", 1)),
    )


def _pool(node: Node, args: list[Tensor | None]) -> Tensor:
    inputs = _arg(node, args, 0)
    kernel = node.ints("kernel_shape")
    rank = len(kernel)
    if rank not in (1, 2, 3) or len(node.outputs) > 1:
        raise node.refuse("only 1-3-d pooling with one output")
    strides = node.ints("strides", [1] * rank)
    ceil_mode = bool(node.attrs.get("ceil_mode", 0))
    begins, ends = _spatial_padding(node, rank)
    if node.op == "MaxPool":
        # Padding never wins a max: pad with −∞ where torch's own padding cannot express it.
        if begins != ends or any(2 * pad > size for pad, size in zip(begins, kernel, strict=True)):
            inputs, begins = F.pad(inputs, _torch_pad(begins, ends), value=-math.inf), [0] * rank
        pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[rank]
        dilation = node.ints("dilations", [1] * rank)
        return pool(inputs, kernel, strides, begins, dilation, ceil_mode=ceil_mode)  # type: ignore[operator]
    include_pad = bool(node.attrs.get("count_include_pad", 0))
    if begins != ends:
        if not include_pad:
            raise node.refuse("asymmetric pads with count_include_pad=0")
        inputs, begins = F.pad(inputs, _torch_pad(begins, ends)), [0] * rank
    average = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[rank]
    return average(  # type: ignore[operator]
        inputs, kernel, strides, begins, ceil_mode=ceil_mode, count_include_pad=include_pad
    )


def _gemm(node: Node, args: list[Tensor | None]) -> Tensor:
    a, b = _arg(node, args, 0), _arg(node, args, 1)
    if node.attrs.get("transA", 0):
        a = a.t()
    if node.attrs.get("transB", 0):
        b = b.t()
    out = a @ b * float(node.attrs.get("alpha", 1.0))
    bias = args[2] if len(args) > 2 else None
    return out if bias is None else out + bias * float(node.attrs.get("beta", 1.0))


def _divide(node: Node, args: list[Tensor | None]) -> Tensor:
    a, b = _arg(node, args, 0), _arg(node, args, 1)
    if a.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")  # ONNX integer division truncates


def _batch_norm(node: Node, args: list[Tensor | None]) -> Tensor:
    if node.attrs.get("training_mode", 0) or len(node.outputs) > 1:
        raise node.refuse("training mode (export the model in eval mode)")
    inputs, mean, var = _arg(node, args, 0), _arg(node, args, 3), _arg(node, args, 4)
    scale, bias = args[1], args[2]
    return F.batch_norm(
        inputs, mean, var, scale, bias, training=False, eps=float(node.attrs.get("epsilon", 1e-5))
    )


def _flatten(node: Node, args: list[Tensor | None]) -> Tensor:
    inputs = _arg(node, args, 0)
    axis = int(node.attrs.get("axis", 1)) % max(inputs.dim(), 1)
    if axis == 0:
        return inputs.reshape(1, -1)
    return inputs.flatten(0, axis - 1).flatten(1) if axis > 1 else inputs.flatten(1)


def _reshape(node: Node, args: list[Tensor | None]) -> Tensor:
    inputs, shape = _arg(node, args, 0), _arg(node, args, 1)
    allow_zero = bool(node.attrs.get("allowzero", 0))
    target = node.constant_ints(1)
    if target is not None:
        # `0` copies the input's axis: a traced size keeps the batch axis dynamic on export.
        sizes: list[Any] = [
            inputs.size(i) if value == 0 and not allow_zero else value
            for i, value in enumerate(target)
        ]
        return inputs.reshape(sizes)
    if allow_zero:
        raise node.refuse("a computed shape with allowzero=1")
    copied = torch.where(shape == 0, torch._shape_as_tensor(inputs)[: shape.numel()], shape)
    return torch._reshape_from_tensor(inputs, copied)


def _softmax(node: Node, args: list[Tensor | None]) -> Tensor:
    inputs = _arg(node, args, 0)
    axis = int(node.attrs.get("axis", -1 if node.opset >= 13 else 1)) % inputs.dim()
    if node.opset >= 13 or axis == inputs.dim() - 1:
        return inputs.softmax(axis)
    # before opset 13: softmax over all axes from `axis` on, flattened
    return inputs.flatten(axis).softmax(-1).reshape(inputs.shape)


def _clip(node: Node, args: list[Tensor | None]) -> Tensor:
    inputs = _arg(node, args, 0)
    if node.opset < 11:
        low, high = node.attrs.get("min"), node.attrs.get("max")
        return inputs.clamp(low, high)
    low_t = args[1] if len(args) > 1 else None
    high_t = args[2] if len(args) > 2 else None
    return inputs.clamp(low_t, high_t)


def _shape(node: Node, args: list[Tensor | None]) -> Tensor:
    start = int(node.attrs.get("start", 0))
    end = node.attrs.get("end")
    shape = torch._shape_as_tensor(_arg(node, args, 0))
    return shape[start:] if end is None else shape[start : int(end)]


def _gather(node: Node, args: list[Tensor | None]) -> Tensor:
    data, indices = _arg(node, args, 0), _arg(node, args, 1)
    axis = int(node.attrs.get("axis", 0)) % data.dim()
    flat = indices.reshape(-1).long()
    flat = torch.where(flat < 0, flat + data.size(axis), flat)
    picked = data.index_select(axis, flat)
    if indices.dim() == 0:
        return picked.squeeze(axis)
    if indices.dim() == 1:
        return picked
    raise node.refuse("indices of rank > 1")


def _slice(node: Node, args: list[Tensor | None]) -> Tensor:
    inputs = _arg(node, args, 0)
    if node.opset < 10:
        raise node.refuse("opset < 10 (starts and ends as attributes)")
    bounds = [node.constant_ints(index) for index in range(1, len(args))]
    if any(bound is None for bound in bounds[:2]) or any(
        args[i] is not None and bounds[i - 1] is None for i in range(3, len(args))
    ):
        raise node.refuse("starts, ends, axes and steps must be constants")
    starts, ends = bounds[0] or [], bounds[1] or []
    axes = (bounds[2] if len(bounds) > 2 and bounds[2] else None) or list(range(len(starts)))
    steps = (bounds[3] if len(bounds) > 3 and bounds[3] else None) or [1] * len(starts)
    index: list[slice] = [slice(None)] * inputs.dim()
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        if step <= 0:
            raise node.refuse("a negative step")
        # ONNX clamps out-of-range bounds (INT64_MAX means "to the end"), as Python slices do
        index[axis % inputs.dim()] = slice(start, min(end, 2**62), step)
    return inputs[tuple(index)]


def _axes(node: Node, args: list[Tensor | None]) -> list[int] | None:
    """`axes` from the attribute (older opsets) or the constant second input (newer)."""
    if "axes" in node.attrs:
        return node.ints("axes")
    if len(args) > 1 and args[1] is not None:
        axes = node.constant_ints(1)
        if axes is None:
            raise node.refuse("axes computed at run time")
        return axes
    return None


def _unsqueeze(node: Node, args: list[Tensor | None]) -> Tensor:
    out = _arg(node, args, 0)
    axes = _axes(node, args) or []
    rank = out.dim() + len(axes)
    for axis in sorted(axis % rank for axis in axes):
        out = out.unsqueeze(axis)
    return out


def _squeeze(node: Node, args: list[Tensor | None]) -> Tensor:
    inputs = _arg(node, args, 0)
    axes = _axes(node, args)
    if axes is None:
        return inputs.squeeze()
    return inputs.squeeze(tuple(axis % inputs.dim() for axis in axes))


def _reduce_mean(node: Node, args: list[Tensor | None]) -> Tensor:
    inputs = _arg(node, args, 0)
    axes = _axes(node, args)
    keep = bool(node.attrs.get("keepdims", 1))
    if axes is None:
        if node.attrs.get("noop_with_empty_axes", 0):
            return inputs
        axes = list(range(inputs.dim()))
    return inputs.mean(dim=tuple(axes), keepdim=keep)


def _cast(node: Node, args: list[Tensor | None]) -> Tensor:
    from onnx.helper import tensor_dtype_to_np_dtype

    target = tensor_dtype_to_np_dtype(int(node.attrs["to"]))
    dtype = {np.dtype(np.float32): torch.float32, np.dtype(np.int64): torch.int64}.get(target)
    if dtype is None:
        raise node.refuse(f"a cast to {target}")
    return _arg(node, args, 0).to(dtype)


def _arg(node: Node, args: list[Tensor | None], index: int) -> Tensor:
    """A required input (absent only in a graph the ONNX checker should have refused)."""
    tensor = args[index] if index < len(args) else None
    if tensor is None:
        raise node.refuse(f"its required input {index} is missing")
    return tensor


def _unary(function: Callable[[Tensor], Tensor]) -> Op:
    return lambda node, args: function(_arg(node, args, 0))


def _binary(function: Callable[[Tensor, Tensor], Tensor]) -> Op:
    return lambda node, args: function(_arg(node, args, 0), _arg(node, args, 1))


OPS: dict[str, Op] = {
    "Conv": _conv,
    "Gemm": _gemm,
    "MatMul": _binary(torch.matmul),
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _divide,
    "Relu": _unary(F.relu),
    "LeakyRelu": lambda node, args: F.leaky_relu(
        _arg(node, args, 0), node.attrs.get("alpha", 0.01)
    ),
    "Sigmoid": _unary(torch.sigmoid),
    "Tanh": _unary(torch.tanh),
    "MaxPool": _pool,
    "AveragePool": _pool,
    "GlobalAveragePool": _unary(lambda x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True)),
    "BatchNormalization": _batch_norm,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Transpose": lambda node, args: _arg(node, args, 0).permute(
        node.ints("perm") or list(reversed(range(_arg(node, args, 0).dim())))
    ),
    "Concat": lambda node, args: torch.cat(
        [arg for arg in args if arg is not None], int(node.attrs["axis"])
    ),
    "Identity": _unary(lambda x: x),
    "Dropout": _unary(lambda x: x),  # inference: identity (a mask output is refused at load)
    "Softmax": _softmax,
    "Clip": _clip,
    "Shape": _shape,
    "Gather": _gather,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Slice": _slice,
    "ReduceMean": _reduce_mean,
    "Cast": _cast,
}
SUPPORTED_OPS = (*OPS, "Constant")
