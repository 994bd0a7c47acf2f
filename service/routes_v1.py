"""The service's own REST API: `POST /v1/models/{name}/predict`. Read, infer, serialise."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request, Response, params
from starlette.datastructures import Headers

from marginwatch.artifact.schema import CalibrationRecord
from marginwatch.service.admission import deadline_of
from marginwatch.service.engine import Prediction
from marginwatch.service.fastpath import inference_route_docs
from marginwatch.service.payload import JSON, BodyFormat, RequestReader, as_float32, parse_json
from marginwatch.service.payload import validate as validate_schema
from marginwatch.service.schemas import OpenApiResponses, PredictRequest, PredictResponse


def decode_predict(body: bytes, _: Headers) -> tuple[np.ndarray, bool]:
    """The inputs of a v1 body as one float32 array, and its `return_probabilities` flag."""
    parsed = validate_schema(PredictRequest, parse_json(body))
    return as_float32(parsed.inputs, "inputs"), parsed.return_probabilities


PREDICT_BODY = BodyFormat((JSON,), decode_predict)


def build_v1_router(
    reader: RequestReader,
    *,
    dependencies: Sequence[params.Depends],
    errors: OpenApiResponses,
) -> APIRouter:
    router = APIRouter(tags=["v1"], dependencies=dependencies)

    @router.post(
        "/v1/models/{name}/predict",
        response_model=PredictResponse,
        responses=errors,
        openapi_extra=inference_route_docs(PredictRequest, PREDICT_BODY.media_types),
        summary="Labels with a brittleness flag for a batch of inputs",
    )
    async def v1_predict(request: Request) -> Response:
        deployment, x, with_probabilities = await reader.read(request, PREDICT_BODY)
        prediction = await deployment.infer(x, deadline_of(request.scope))
        model = deployment.model
        return Response(
            orjson.dumps(_serialise(model.name, model.record, prediction, with_probabilities)),
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
