"""The Open Inference Protocol v2 subset: server and model metadata, health, readiness, and infer
with its wire format, JSON or the binary tensor data extension (what tritonclient sends by
default). The routes read, infer, serialise; the outputs are `engine.SERVED_OUTPUTS`. The infer
route returns a finished `Response`, so FastAPI neither validates nor re-serialises it
(`response_model` only documents). The same protocol over gRPC (`grpc_servicer.py`,
`grpc_convert.py`) reads tensors with `input_array` and `requested_outputs` and writes raw
outputs with `raw_tensor`: the checks are these, whatever the transport.

Binary extension: a request with the header `Inference-Header-Content-Length: n` carries a JSON
header in its first n bytes, then the raw little-endian bytes of every input whose
`parameters.binary_data_size` is set, in input order. A response does the same for outputs asked
for with `parameters.binary_data: true` (per output) or `parameters.binary_data_output: true`
(for all outputs of the request).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request, Response, params
from starlette.datastructures import Headers

from marginwatch.artifact.graph import INPUT_NAME
from marginwatch.service.admission import deadline_of
from marginwatch.service.budgets import at_budget, budget_facts, budget_index, parameters_eps
from marginwatch.service.decoding import as_float32, parse_json
from marginwatch.service.decoding import validate as validate_schema
from marginwatch.service.engine import (
    INPUT_DATATYPE,
    SERVED_OUTPUTS,
    OutputSpec,
    Prediction,
    calibration_facts,
)
from marginwatch.service.errors import InvalidInput, ModelNotReady
from marginwatch.service.payload import JSON, OCTET_STREAM, BodyFormat, RequestReader
from marginwatch.service.registry import ModelRegistry
from marginwatch.service.schemas import (
    InferenceRequest,
    InferenceResponse,
    LiveResponse,
    ModelMetadataResponse,
    OpenApiResponses,
    ReadyResponse,
    ServerMetadata,
    inference_route_docs,
)

SERVER_NAME = "marginwatch"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["binary_tensor_data"]
HEADER_LENGTH = "inference-header-content-length"
DTYPES: dict[str, np.dtype[Any]] = {  # keys: `schemas.Datatype`
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
OUTPUT_NAMED = {output.name: output for output in SERVED_OUTPUTS}
# The extension's header in the OpenAPI document, so that clients and schema-driven fuzzers see it
HEADER_LENGTH_DOCS = {
    "name": HEADER_LENGTH,
    "in": "header",
    "required": False,
    "schema": {"type": "integer", "minimum": 1},
    "description": "binary tensor data extension: the length of the JSON header that starts the "
    "body; the raw tensor bytes follow it",
}
# (output, as binary) for each output a response carries
Asked = list[tuple[OutputSpec, bool]]


def build_health_router(
    registry: ModelRegistry, *, dependencies: Sequence[params.Depends], errors: OpenApiResponses
) -> APIRouter:
    router = APIRouter(tags=["health"], dependencies=dependencies)

    @router.get("/v2/health/live", response_model=LiveResponse)
    async def v2_live() -> LiveResponse:
        return LiveResponse(live=True)

    @router.get("/v2/health/ready", response_model=ReadyResponse, responses=errors)
    async def v2_ready() -> ReadyResponse:
        if not registry.ready():
            missing = [name for name in registry.names() if not _is_ready(registry, name)]
            raise ModelNotReady(
                f"not ready: no verified version loaded for {missing or 'any model'}"
            )
        return ReadyResponse(ready=True)

    return router


def _is_ready(registry: ModelRegistry, name: str) -> bool:
    try:
        registry.get(name)
    except ModelNotReady:
        return False
    return True


def build_v2_router(
    registry: ModelRegistry,
    reader: RequestReader,
    *,
    dependencies: Sequence[params.Depends],
    errors: OpenApiResponses,
) -> APIRouter:
    router = APIRouter(tags=["v2"], responses=errors, dependencies=dependencies)

    # infer first: the route table is matched in order (see app.splice_routes)
    @router.post(
        "/v2/models/{name}/infer",
        response_model=InferenceResponse,
        openapi_extra=_infer_docs(),
        summary="Infer (JSON, or the binary tensor data extension)",
    )
    async def v2_infer(request: Request) -> Response:
        deployment, x, (request_id, asked, eps) = await reader.read(request, INFER_BODY)
        model = deployment.model
        budget = budget_index(model, eps)
        prediction = await deployment.infer(x, deadline_of(request.scope))
        prediction = at_budget(model, prediction, budget)
        record = model.record
        header = {
            "model_name": model.name,
            "model_version": record.version,
            "id": request_id,
            "parameters": {**calibration_facts(record), **budget_facts(model, budget)},
        }
        content, header_length = encode_response(header, prediction, asked)
        if header_length is None:
            return Response(content, media_type=JSON)
        return Response(
            content, media_type=OCTET_STREAM, headers={HEADER_LENGTH: str(header_length)}
        )

    @router.get("/v2", response_model=ServerMetadata)
    async def v2_server_metadata() -> ServerMetadata:
        return ServerMetadata(name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS)

    @router.get("/v2/models/{name}", response_model=ModelMetadataResponse)
    async def v2_model_metadata(name: str) -> ModelMetadataResponse:
        meta = registry.get(name).model.metadata()
        return ModelMetadataResponse.model_validate(
            {
                "name": meta.name,
                "versions": [meta.version],
                "platform": meta.platform,
                "inputs": [vars(spec) for spec in meta.inputs],
                "outputs": [vars(spec) for spec in meta.outputs],
                "parameters": {**meta.calibration, "providers": meta.providers},
            }
        )

    @router.get("/v2/models/{name}/ready", response_model=ReadyResponse)
    async def v2_model_ready(name: str) -> ReadyResponse:
        registry.get(name)
        return ReadyResponse(ready=True)

    return router


def _infer_docs() -> dict[str, Any]:
    docs = inference_route_docs(InferenceRequest, INFER_BODY.media_types)
    return {**docs, "parameters": [*docs["parameters"], HEADER_LENGTH_DOCS]}


# --- request --------------------------------------------------------------------------------


def decode_infer(
    body: bytes, headers: Headers
) -> tuple[np.ndarray, tuple[str | None, Asked, float | None]]:
    """The one input as a float32 array (not yet checked), the request id, the outputs and the
    budget asked for (`parameters.eps`)."""
    header, binary = split_body(body, headers.get(HEADER_LENGTH))
    parsed = validate_schema(InferenceRequest, parse_json(header))
    options = (parsed.id, requested_outputs(parsed), parameters_eps(parsed.parameters))
    return input_array(parsed, binary, header), options


INFER_BODY = BodyFormat(
    (JSON, OCTET_STREAM), decode_infer, what=f"input {INPUT_NAME!r}", binary_header=HEADER_LENGTH
)


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """The JSON header and the binary part (empty without the extension's header)."""
    if header_length is None:
        return body, memoryview(b"")
    length = _header_length(header_length, len(body))
    return body[:length], memoryview(body)[length:]


def _header_length(value: str, body_size: int) -> int:
    """The header's value as a length within the body. ASCII digits only: `str.isdigit` also
    accepts digits such as "²" (header bytes are read as Latin-1) that `int` refuses."""
    text = value.strip()
    if not (text.isascii() and text.isdigit()):
        raise InvalidInput(f"Inference-Header-Content-Length must be an integer, not {_clip(text)}")
    digits = text.lstrip("0") or "0"
    # `int` refuses more than 4,300 digits; more digits than the body's size has is past its end
    length = int(digits) if len(digits) <= len(str(body_size)) else body_size + 1
    if not 0 < length <= body_size:
        raise InvalidInput(
            f"Inference-Header-Content-Length is {_clip(text)}, but the body has {body_size} bytes"
        )
    return length


def _clip(text: str, limit: int = 40) -> str:
    """`text` quoted for an error message, cut short: a header may be kilobytes long."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}…"


def binary_inputs(request: InferenceRequest, binary: memoryview) -> dict[str, np.ndarray]:
    """The inputs sent as raw bytes, each a flat array of its datatype (copied, aligned)."""
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for tensor in request.inputs:
        size = tensor.parameters.binary_data_size  # an integer ≥ 0: the schema says so
        if size is None:
            continue
        dtype = DTYPES[tensor.datatype]
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


def input_array(request: InferenceRequest, binary: memoryview, header: bytes = b"") -> np.ndarray:
    """The one input tensor, from JSON data or binary bytes, reshaped to its declared shape.
    `header` is the JSON text the request was parsed from (`as_float32` reads it)."""
    names = [tensor.name for tensor in request.inputs]
    if names != [INPUT_NAME]:
        raise InvalidInput(f"the model takes one input named {INPUT_NAME!r}; got {names}")
    tensor = request.inputs[0]
    if tensor.datatype != INPUT_DATATYPE:
        raise InvalidInput(
            f"input {INPUT_NAME!r} must have datatype {INPUT_DATATYPE}, not {tensor.datatype!r}"
        )
    raw = binary_inputs(request, binary).get(INPUT_NAME)
    data = raw if raw is not None else tensor.data
    if data is None:
        raise InvalidInput(f"input {INPUT_NAME!r} has neither `data` nor binary_data_size")
    array = as_float32(data, f"input {INPUT_NAME!r}", header)
    expected = math.prod(tensor.shape)  # exact: numpy's product wraps around past int64
    if array.size != expected:
        raise InvalidInput(
            f"input {INPUT_NAME!r} declares shape {tensor.shape} ({expected} values) but carries "
            f"{array.size} values"
        )
    if not expected:
        # refused here rather than reshaped: numpy refuses a shape holding no values whose other
        # dimensions multiply past its index range
        raise InvalidInput(
            f"input {INPUT_NAME!r} declares shape {tensor.shape}, which holds no values: an empty "
            "batch or empty samples"
        )
    return array.reshape(tensor.shape)


def requested_outputs(request: InferenceRequest) -> Asked:
    """Each output to return and whether as binary: the ones asked for, else all of them."""
    default_binary = request.parameters.get("binary_data_output") is True
    if request.outputs is None:
        return [(output, default_binary) for output in SERVED_OUTPUTS]
    chosen = []
    seen: set[str] = set()
    for output in request.outputs:
        spec = OUTPUT_NAMED.get(output.name)
        if spec is None:
            raise InvalidInput(
                f"unknown output {output.name!r}; outputs are {', '.join(OUTPUT_NAMED)}"
            )
        # refused, not repeated: each repeat would copy the whole output into the response
        if output.name in seen:
            raise InvalidInput(f"output {output.name!r} is asked for more than once")
        seen.add(output.name)
        chosen.append((spec, output.parameters.get("binary_data", default_binary) is True))
    return chosen


# --- response -------------------------------------------------------------------------------


def raw_tensor(spec: OutputSpec, array: np.ndarray) -> bytes:
    """An output's raw bytes: row-major, little-endian, its datatype's width (the binary tensor
    extension's layout, and gRPC's `raw_output_contents`)."""
    return np.ascontiguousarray(array, dtype=DTYPES[spec.datatype]).tobytes()


def encode_response(
    header: dict[str, Any], prediction: Prediction, asked: Asked
) -> tuple[bytes, int | None]:
    """The body, and the JSON header's length when any output travels as binary (else None)."""
    outputs = []
    blobs = []
    for spec, binary in asked:
        array: np.ndarray = getattr(prediction, spec.field)
        entry: dict[str, Any] = {
            "name": spec.name,
            "shape": list(array.shape),
            "datatype": spec.datatype,
        }
        if binary:
            raw = raw_tensor(spec, array)
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = array.ravel().tolist()
        outputs.append(entry)
    encoded = orjson.dumps({**header, "outputs": outputs})
    if not blobs:
        return encoded, None
    return encoded + b"".join(blobs), len(encoded)
