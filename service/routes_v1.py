"""The service's own REST API: `POST /v1/models/{name}/predict`. Parse, infer, serialise."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request, Response, params

from marginwatch.artifact.schema import CalibrationRecord
from marginwatch.service.engine import Prediction
from marginwatch.service.payload import (
    JSON,
    as_float32,
    check_batch,
    check_content_type,
    parse_json,
    read_body,
)
from marginwatch.service.payload import validate as validate_schema
from marginwatch.service.registry import ModelRegistry
from marginwatch.service.schemas import (
    ERROR_RESPONSES,
    PredictRequest,
    PredictResponse,
    inference_route_docs,
)
from marginwatch.service.settings import Settings


def build_v1_router(
    registry: ModelRegistry, settings: Settings, dependencies: Sequence[params.Depends]
) -> APIRouter:
    router = APIRouter(tags=["v1"], dependencies=dependencies)

    @router.post(
        "/v1/models/{name}/predict",
        response_model=PredictResponse,
        responses=ERROR_RESPONSES,
        openapi_extra=inference_route_docs(PredictRequest),
        summary="Labels with a brittleness flag for a batch of inputs",
    )
    async def v1_predict(request: Request) -> Response:
        name: str = request.path_params["name"]
        registry.get(name)
        check_content_type(request, (JSON,))
        body = await read_body(request, settings.max_body_bytes)
        deployment = registry.get(name)
        record = deployment.model.record
        x, with_probabilities = _parse(body, record, settings.max_inputs_per_request)
        # no reference to the body or its parsed lists lives across the await: at concurrency
        # 64 they would keep megabytes of Python floats alive and out of the CPU's caches
        del body
        prediction = await deployment.infer(x)
        return Response(
            orjson.dumps(_serialise(name, record, prediction, with_probabilities)),
            media_type=JSON,
        )

    return router


def _parse(body: bytes, record: CalibrationRecord, max_inputs: int) -> tuple[np.ndarray, bool]:
    """The validated float32 batch and the `return_probabilities` flag of a request body."""
    parsed = validate_schema(PredictRequest, parse_json(body))
    x = check_batch(
        as_float32(parsed.inputs, "inputs"),
        input_shape=record.input_shape,
        input_range=record.input_range,
        max_inputs=max_inputs,
    )
    return x, parsed.return_probabilities


def _serialise(
    name: str, record: CalibrationRecord, prediction: Prediction, with_probabilities: bool
) -> dict[str, Any]:
    common = {"threshold": record.threshold, "calibration_version": record.version}
    columns = zip(
        prediction.labels.tolist(),
        prediction.scores.tolist(),
        prediction.brittle.tolist(),
        prediction.borderline.tolist(),
        strict=True,
    )
    items = [
        {
            "label": label,
            "class_name": record.class_names[label],
            "score": score,
            "brittle": brittle,
            "borderline": borderline,
            **common,
        }
        for label, score, brittle, borderline in columns
    ]
    if with_probabilities:
        for item, probabilities in zip(items, prediction.probabilities().tolist(), strict=True):
            item["probabilities"] = probabilities
    return {"model_name": name, "calibration_version": record.version, "predictions": items}
