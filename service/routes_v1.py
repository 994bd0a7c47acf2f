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
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request, Response, params
from starlette.datastructures import Headers

from marginwatch.service.admission import deadline_of
from marginwatch.service.budgets import EPS, at_budget, budget_index, eps_value
from marginwatch.service.decoding import as_float32, parse_json
from marginwatch.service.decoding import validate as validate_schema
from marginwatch.service.engine import Prediction, ServedModel
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


@dataclass(frozen=True, slots=True)
class PredictOptions:
    """A v1 request's options besides its inputs."""

    with_probabilities: bool
    eps: float | None  # the budget asked for (`budgets.py`); None: the served one


def decode_predict(
    body: bytes, headers: Headers
) -> tuple[np.ndarray | EncodedImages, PredictOptions]:
    """The inputs of a v1 body, as one float32 array or as image files, and its options."""
    if is_form(headers):
        parts, flags, numbers = read_form(body, headers["content-type"])
        options = PredictOptions(flags.get("return_probabilities", False), numbers.get(EPS))
        return EncodedImages(parts, base64=False, resize=flags.get(RESIZE)), options
    parsed = validate_schema(PredictRequest, parse_json(body))
    eps = None if parsed.eps is None else eps_value(parsed.eps, EPS)
    options = PredictOptions(parsed.return_probabilities, eps)
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
        return EncodedImages(files, base64=True, resize=resize), options
    if resize is not None:
        raise InvalidInput(f"{RESIZE} applies to images; these inputs are floats")
    x = as_float32(parsed.instances if given == ["instances"] else parsed.inputs, given[0], body)
    return x, options


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
        deployment, x, options = await reader.read(request, PREDICT_BODY)
        model = deployment.model
        budget = budget_index(model, options.eps)
        prediction = await deployment.infer(x, deadline_of(request.scope))
        prediction = at_budget(model, prediction, budget)
        body = _serialise(model, prediction, options.with_probabilities)
        return Response(orjson.dumps(body), media_type=JSON)

    return router


def _serialise(
    model: ServedModel, prediction: Prediction, with_probabilities: bool
) -> dict[str, Any]:
    record = model.record
    names = record.class_names
    chosen = model.answers.budgets[prediction.budget]
    common = {"threshold": chosen.threshold, EPS: chosen.eps, "calibration_version": record.version}
    columns = zip(
        prediction.labels.tolist(),
        prediction.scores.tolist(),
        prediction.brittle.tolist(),
        prediction.borderline.tolist(),
        prediction.p_robust.tolist(),
        prediction.margin_estimate.tolist(),
        prediction.margin_low.tolist(),
        prediction.margin_high.tolist(),
        prediction.runner_up.tolist(),
        strict=True,
    )
    # NaN (a version calibrated before these answers) becomes JSON's null through orjson
    items = [
        {
            "label": label,
            "class_name": names[label],
            "score": score,
            "brittle": brittle,
            "borderline": borderline,
            "p_robust": p_robust,
            "margin_estimate": estimate,
            "margin_interval": [low, high],
            "runner_up": up,
            "runner_up_class_name": names[up],
            **common,
        }
        for label, score, brittle, borderline, p_robust, estimate, low, high, up in columns
    ]
    if with_probabilities:
        for item, probabilities in zip(items, prediction.probabilities().tolist(), strict=True):
            item["probabilities"] = probabilities
    return {"model_name": model.name, "calibration_version": record.version, "predictions": items}
