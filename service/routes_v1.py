"""The service's own REST API: `POST /v1/models/{name}/predict`. Read, infer, serialise.

A body is floats in JSON (`inputs`, or KServe v1's `instances`), or image files: a multipart form
of `file` parts, base64 strings in JSON (`images`, or KServe v1's `{"b64": ...}` instances).
Image files leave here undecoded (`images.EncodedImages`): the request reader decodes them for
the model that serves the request, and the response is the one the decoded floats would get.
The route returns a finished `Response`, so FastAPI neither validates nor re-serialises it
(`response_model` only documents).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request, Response, params
from starlette.datastructures import Headers

from marginwatch.artifact.schema import CalibrationRecord
from marginwatch.service.admission import deadline_of
from marginwatch.service.decoding import as_float32, parse_json
from marginwatch.service.decoding import validate as validate_schema
from marginwatch.service.engine import Prediction
from marginwatch.service.errors import InvalidInput
from marginwatch.service.images import RESIZE, EncodedImages, read_form
from marginwatch.service.payload import FORM, JSON, BodyFormat, RequestReader, is_form
from marginwatch.service.schemas import (
    OpenApiResponses,
    PredictForm,
    PredictRequest,
    PredictResponse,
    inference_route_docs,
    request_body,
)

BATCH_FIELDS = ("inputs", "instances", "images")
B64 = "b64"  # KServe v1's key of an instance that is a base64 file


def decode_predict(body: bytes, headers: Headers) -> tuple[np.ndarray | EncodedImages, bool]:
    """The inputs of a v1 body, as one float32 array or as image files, and its
    `return_probabilities` flag."""
    if is_form(headers):
        parts, flags = read_form(body, headers["content-type"])
        with_probabilities = flags.get("return_probabilities", False)
        return EncodedImages(parts, base64=False, resize=flags.get(RESIZE)), with_probabilities
    parsed = validate_schema(PredictRequest, parse_json(body))
    given = [field for field in BATCH_FIELDS if field in parsed.model_fields_set]
    if len(given) != 1:
        problem = "inputs: Field required" if not given else f"{' and '.join(given)} together"
        raise InvalidInput(
            f"invalid request: {problem}; send one of inputs (floats), instances (KServe v1: "
            "floats or b64 files) or images (base64 files)"
        )
    resize = parsed.resize if RESIZE in parsed.model_fields_set else None
    files = _base64_files(parsed)
    if files is not None:
        return EncodedImages(files, base64=True, resize=resize), parsed.return_probabilities
    if resize is not None:
        raise InvalidInput(f"{RESIZE} applies to images; these inputs are floats")
    x = as_float32(parsed.instances if given == ["instances"] else parsed.inputs, given[0], body)
    return x, parsed.return_probabilities


def _base64_files(parsed: PredictRequest) -> list[tuple[str, bytes]] | None:
    """The base64 files of `images`, or of `instances` of the form {"b64": ...}; None for
    floats. A string that is not ASCII stays so, for base64 decoding to refuse."""
    if "images" in parsed.model_fields_set:
        return [(f"images[{i}]", text.encode()) for i, text in enumerate(parsed.images)]
    instances = parsed.instances
    if not any(isinstance(instance, dict) for instance in instances):
        return None
    files = []
    for index, instance in enumerate(instances):
        if not (isinstance(instance, dict) and instance.keys() == {B64}):
            raise InvalidInput(
                f"instances[{index}] must be {{{B64!r}: <base64 image file>}} like the other "
                "instances: a request's instances are all samples of floats or all image files"
            )
        text = instance[B64]
        if not isinstance(text, str):
            raise InvalidInput(f"instances[{index}].{B64} must be a string of base64")
        files.append((f"instances[{index}].{B64}", text.encode()))
    return files


PREDICT_BODY = BodyFormat((JSON, FORM), decode_predict, images=True)


def _predict_docs() -> dict[str, Any]:
    """The route's body in both media types: JSON (`PredictRequest`) and a form (`PredictForm`)."""
    docs = inference_route_docs(PredictRequest, (JSON,))
    form = request_body(PredictForm, (FORM,))["requestBody"]["content"]
    docs["requestBody"]["content"].update(form)
    return docs


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
        openapi_extra=_predict_docs(),
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
