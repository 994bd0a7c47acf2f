"""Request and response models: the service's own REST API (v1) and the Open Inference Protocol
v2 subset. Bodies are parsed with orjson and then checked against these models; tensor data stay
`Any` here and become one numpy array in one call (`payload.py`), never element by element.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorResponse(_Strict):
    error: str = Field(description="what is wrong, in words")


# --- v1 -------------------------------------------------------------------------------------


class PredictRequest(_Strict):
    inputs: list[Any] = Field(
        description="a batch of samples, each nested lists of the model's input shape (C×H×W), "
        "floats in the model's input range"
    )
    return_probabilities: bool = Field(default=False, description="add softmax probabilities")


class PredictionItem(_Strict):
    label: int
    class_name: str
    probabilities: list[float] | None = None
    score: float = Field(description="the brittleness score computed by the served graph")
    threshold: float = Field(description="λ: the decision is brittle when score < λ")
    brittle: bool
    borderline: bool = Field(description="|score − λ| ≤ the calibration's guard band")
    calibration_version: str


class PredictResponse(_Strict):
    model_name: str
    calibration_version: str
    predictions: list[PredictionItem]


# --- Open Inference Protocol v2 ------------------------------------------------------------


class RequestInput(_Open):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: Any = Field(default=None, description="flat or nested; absent with binary data")


class RequestOutput(_Open):
    name: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class InferenceRequest(_Open):
    id: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


class ResponseOutput(_Strict):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferenceResponse(_Strict):
    model_name: str
    model_version: str
    id: str | None = None
    parameters: dict[str, Any]
    outputs: list[ResponseOutput]


class ServerMetadata(_Strict):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(_Strict):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadataResponse(_Strict):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any]


class LiveResponse(_Strict):
    live: bool


class ReadyResponse(_Strict):
    ready: bool


def request_body(model: type[BaseModel], *media_types: str) -> dict[str, Any]:
    """`openapi_extra` documenting a body that the route reads itself (with orjson)."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            reference = node.get("$ref")
            if isinstance(reference, str) and reference.startswith("#/$defs/"):
                return inline(definitions[reference.removeprefix("#/$defs/")])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(value) for value in node]
        return node

    content = {media: {"schema": inline(schema)} for media in media_types or ("application/json",)}
    return {"requestBody": {"required": True, "content": content}}


def inference_route_docs(model: type[BaseModel], *media_types: str) -> dict[str, Any]:
    """`openapi_extra` of an inference route: its body (`request_body`) and its `{name}`.

    The inference routes read `name` from `request.path_params` instead of declaring it as an
    argument: FastAPI's parameter validation costs about 9 µs a request (docs/benchmarks.md), 6 %
    of this service's own time per one-image request, for a string that the registry checks.
    """
    name = {
        "name": "name",
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
        "description": "the served model",
    }
    return {**request_body(model, *media_types), "parameters": [name]}


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 415, 503)
}
