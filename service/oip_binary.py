"""The Open Inference Protocol's binary tensor data extension (what tritonclient sends by default).

A request with the header `Inference-Header-Content-Length: n` carries a JSON header in its first n
bytes, then the raw little-endian bytes of every input whose `parameters.binary_data_size` is set,
in input order. A response does the same for outputs asked for with `parameters.binary_data: true`
(per output) or `parameters.binary_data_output: true` (for all outputs of the request).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from marginwatch.service.errors import InvalidInput
from marginwatch.service.schemas import InferenceRequest

HEADER_LENGTH = "inference-header-content-length"
DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """The JSON header and the binary part (empty without the extension's header)."""
    if header_length is None:
        return body, memoryview(b"")
    if not header_length.strip().isdigit():
        raise InvalidInput(
            f"Inference-Header-Content-Length must be an integer, not {header_length!r}"
        )
    length = int(header_length)
    if not 0 < length <= len(body):
        raise InvalidInput(
            f"Inference-Header-Content-Length is {length}, but the body has {len(body)} bytes"
        )
    return body[:length], memoryview(body)[length:]


def binary_inputs(request: InferenceRequest, binary: memoryview) -> dict[str, np.ndarray]:
    """The inputs sent as raw bytes, each a flat array of its datatype (copied, aligned)."""
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for tensor in request.inputs:
        size = tensor.parameters.get("binary_data_size")
        if size is None:
            continue
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidInput(f"input {tensor.name!r}: binary_data_size must be an integer ≥ 0")
        dtype = DTYPES.get(tensor.datatype)
        if dtype is None:
            raise InvalidInput(f"input {tensor.name!r}: unknown datatype {tensor.datatype!r}")
        if offset + size > len(binary):
            raise InvalidInput(
                f"input {tensor.name!r}: binary_data_size {size} runs past the body's "
                f"{len(binary)} binary bytes"
            )
        if size % dtype.itemsize:
            raise InvalidInput(
                f"input {tensor.name!r}: {size} bytes is not a whole number of {tensor.datatype}"
            )
        chunk = binary[offset : offset + size]
        arrays[tensor.name] = np.frombuffer(chunk, dtype=dtype).astype(dtype.newbyteorder("="))
        offset += size
    if offset != len(binary):
        raise InvalidInput(
            f"the body has {len(binary) - offset} binary bytes that no input's binary_data_size "
            "accounts for"
        )
    return arrays


@dataclass(frozen=True)
class OutputTensor:
    name: str
    datatype: str
    array: np.ndarray
    binary: bool


def encode_response(
    header: dict[str, Any], tensors: Sequence[OutputTensor]
) -> tuple[bytes, int | None]:
    """The body, and the JSON header's length when any output travels as binary (else None)."""
    outputs = []
    blobs = []
    for tensor in tensors:
        entry: dict[str, Any] = {
            "name": tensor.name,
            "shape": list(tensor.array.shape),
            "datatype": tensor.datatype,
        }
        if tensor.binary:
            raw = np.ascontiguousarray(tensor.array, dtype=DTYPES[tensor.datatype]).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = tensor.array.ravel().tolist()
        outputs.append(entry)
    encoded = orjson.dumps({**header, "outputs": outputs})
    if not blobs:
        return encoded, None
    return encoded + b"".join(blobs), len(encoded)


OUTPUT_DATATYPES = {
    "logits": "FP32",
    "label": "INT64",
    "score": "FP32",
    "brittle": "BOOL",
    "borderline": "BOOL",
}


def input_array(request: InferenceRequest, binary: memoryview, input_name: str) -> np.ndarray:
    """The one input tensor, from JSON data or binary bytes, reshaped to its declared shape."""
    names = [tensor.name for tensor in request.inputs]
    if names != [input_name]:
        raise InvalidInput(f"the model takes one input named {input_name!r}; got {names}")
    tensor = request.inputs[0]
    if tensor.datatype != "FP32":
        raise InvalidInput(f"input {input_name!r} must have datatype FP32, not {tensor.datatype!r}")
    if any(dim < 0 for dim in tensor.shape):
        raise InvalidInput(f"input {input_name!r} has a negative dimension in shape {tensor.shape}")
    raw = binary_inputs(request, binary).get(input_name)
    data = raw if raw is not None else tensor.data
    if data is None:
        raise InvalidInput(f"input {input_name!r} has neither `data` nor binary_data_size")
    try:
        array = np.asarray(data, dtype=np.float32)
    except (ValueError, TypeError):
        raise InvalidInput(f"input {input_name!r}: data must be FP32 numbers") from None
    expected = int(np.prod(tensor.shape))
    if array.size != expected:
        raise InvalidInput(
            f"input {input_name!r} declares shape {tensor.shape} ({expected} values) but carries "
            f"{array.size} values"
        )
    return array.reshape(tensor.shape)


def requested_outputs(request: InferenceRequest) -> list[tuple[str, bool]]:
    """(name, as binary) of each output to return: the ones asked for, else all of them."""
    default_binary = request.parameters.get("binary_data_output") is True
    if request.outputs is None:
        return [(name, default_binary) for name in OUTPUT_DATATYPES]
    chosen = []
    for output in request.outputs:
        if output.name not in OUTPUT_DATATYPES:
            raise InvalidInput(
                f"unknown output {output.name!r}; outputs are {', '.join(OUTPUT_DATATYPES)}"
            )
        chosen.append((output.name, output.parameters.get("binary_data", default_binary) is True))
    return chosen
