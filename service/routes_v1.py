"""The service's own REST API: `POST /v1/models/{name}/predict`. Parse, infer, serialise."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request, Response

from calibration.artifact import CalibrationRecord
from service.engine import Prediction
from service.payload import JSON, as_float32, check_batch, check_content_type, parse_json, read_body
from service.payload import validate as validate_schema
from service.registry import ModelRegistry
from service.schemas import ERROR_RESPONSES, PredictRequest, PredictResponse, request_body
from service.settings import Settings


def build_v1_router(registry: ModelRegistry, settings: Settings) -> APIRouter:
    router = APIRouter(tags=["v1"])

    @router.post(
        "/v1/models/{name}/predict",
        response_model=PredictResponse,
        responses=ERROR_RESPONSES,
        openapi_extra=request_body(PredictRequest),
        summary="Labels with a brittleness flag for a batch of inputs",
    )
    async def v1_predict(name: str, request: Request) -> Response:
        registry.get(name)
        check_content_type(request, (JSON,))
        body = await read_body(request, settings.max_body_bytes)
        parsed = validate_schema(PredictRequest, parse_json(body))
        deployment = registry.get(name)
        record = deployment.model.record
        x = check_batch(
            as_float32(parsed.inputs, "inputs"),
            input_shape=record.input_shape,
            input_range=record.input_range,
            max_inputs=settings.max_inputs_per_request,
        )
        prediction = await deployment.infer(x)
        return Response(
            orjson.dumps(_serialise(name, record, prediction, parsed.return_probabilities)),
            media_type=JSON,
        )

    return router


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
