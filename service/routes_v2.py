"""The Open Inference Protocol v2 subset: server and model metadata, health, readiness, infer
(JSON and the binary tensor data extension). Parse, infer, serialise."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from fastapi import APIRouter, Request, Response, params

from marginwatch.artifact.graph import INPUT_NAME
from marginwatch.artifact.schema import CalibrationRecord
from marginwatch.service.engine import calibration_facts
from marginwatch.service.errors import ModelNotReady
from marginwatch.service.oip_binary import (
    HEADER_LENGTH,
    OUTPUT_DATATYPES,
    OutputTensor,
    encode_response,
    input_array,
    requested_outputs,
    split_body,
)
from marginwatch.service.payload import (
    JSON,
    OCTET_STREAM,
    check_batch,
    check_content_type,
    parse_json,
    read_body,
)
from marginwatch.service.payload import validate as validate_schema
from marginwatch.service.registry import ModelRegistry
from marginwatch.service.schemas import (
    ERROR_RESPONSES,
    InferenceRequest,
    InferenceResponse,
    LiveResponse,
    ModelMetadataResponse,
    ReadyResponse,
    ServerMetadata,
    inference_route_docs,
)
from marginwatch.service.settings import Settings

SERVER_NAME = "marginwatch"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["binary_tensor_data"]


def build_health_router(
    registry: ModelRegistry, dependencies: Sequence[params.Depends]
) -> APIRouter:
    router = APIRouter(tags=["health"], dependencies=dependencies)

    @router.get("/v2/health/live", response_model=LiveResponse)
    async def v2_live() -> LiveResponse:
        return LiveResponse(live=True)

    @router.get("/v2/health/ready", response_model=ReadyResponse, responses=ERROR_RESPONSES)
    async def v2_ready() -> ReadyResponse:
        if not registry.ready():
            missing = [name for name in registry.names() if not _is_ready(registry, name)]
            raise ModelNotReady(
                f"not ready: no verified version loaded for {missing or 'any model'}"
            )
        return ReadyResponse(ready=True)

    return router


def _parse_infer(
    body: bytes, header_length: str | None, record: CalibrationRecord, max_inputs: int
) -> tuple[np.ndarray, str | None, list[tuple[str, bool]]]:
    """The validated float32 batch, the request id and the requested outputs of an infer body."""
    header, binary = split_body(body, header_length)
    parsed = validate_schema(InferenceRequest, parse_json(header))
    x = check_batch(
        input_array(parsed, binary, INPUT_NAME),
        input_shape=record.input_shape,
        input_range=record.input_range,
        max_inputs=max_inputs,
        what=f"input {INPUT_NAME!r}",
    )
    return x, parsed.id, requested_outputs(parsed)


def _is_ready(registry: ModelRegistry, name: str) -> bool:
    try:
        registry.get(name)
    except ModelNotReady:
        return False
    return True


def build_v2_router(
    registry: ModelRegistry, settings: Settings, dependencies: Sequence[params.Depends]
) -> APIRouter:
    router = APIRouter(tags=["v2"], responses=ERROR_RESPONSES, dependencies=dependencies)

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

    @router.post(
        "/v2/models/{name}/infer",
        response_model=InferenceResponse,
        openapi_extra=inference_route_docs(InferenceRequest, JSON, OCTET_STREAM),
        summary="Infer (JSON, or the binary tensor data extension)",
    )
    async def v2_infer(request: Request) -> Response:
        name: str = request.path_params["name"]
        registry.get(name)
        check_content_type(request, (JSON, OCTET_STREAM))
        body = await read_body(request, settings.max_body_bytes)
        deployment = registry.get(name)
        record = deployment.model.record
        x, request_id, outputs = _parse_infer(
            body, request.headers.get(HEADER_LENGTH), record, settings.max_inputs_per_request
        )
        del body  # nothing parsed stays alive across the await (see routes_v1)
        prediction = await deployment.infer(x)
        arrays = {
            "logits": prediction.logits,
            "label": prediction.labels,
            "score": prediction.scores,
            "brittle": prediction.brittle,
            "borderline": prediction.borderline,
        }
        content, header_length = encode_response(
            {
                "model_name": name,
                "model_version": record.version,
                "id": request_id,
                "parameters": calibration_facts(record),
            },
            [
                OutputTensor(out, OUTPUT_DATATYPES[out], arrays[out], binary)
                for out, binary in outputs
            ],
        )
        if header_length is None:
            return Response(content, media_type=JSON)
        return Response(
            content, media_type=OCTET_STREAM, headers={HEADER_LENGTH: str(header_length)}
        )

    return router
