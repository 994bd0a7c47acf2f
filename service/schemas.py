"""Request and response models: the service's own REST API (v1) and the Open Inference Protocol
v2 subset. Bodies are parsed with orjson and then checked against these models; tensor data stay
`Any` here and become one numpy array in one call (`payload.py`), never element by element.
The inference routes' bodies and `{name}`, read by the request reader rather than declared to
FastAPI, are documented by hand (`request_body`, `inference_route_docs`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorResponse(_Strict):
    error: str = Field(description="what is wrong, in words")


# --- v1 -------------------------------------------------------------------------------------


class PredictRequest(_Strict):
    """A v1 body in JSON: exactly one of `inputs`, `instances` or `images`. The route tells the
    one given by `model_fields_set` (the schema states the rule with `oneOf`), so that the empty
    list a missing field defaults to stays apart from an empty batch."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "oneOf": [{"required": [key]} for key in ("inputs", "instances", "images")]
        },
    )

    inputs: list[Any] = Field(
        default_factory=list,
        description="a batch of samples, each nested lists of the model's input shape (C×H×W), "
        "floats in the model's input range",
        # stated for the schema only: `check_batch` refuses an empty batch with the message both
        # APIs share
        json_schema_extra={"minItems": 1},
    )
    instances: list[Any] = Field(
        default_factory=list,
        description="KServe's v1 form: the same samples as `inputs`, or one "
        '`{"b64": "<base64 image file>"}` per image',
        json_schema_extra={"minItems": 1},
    )
    images: list[str] = Field(
        default_factory=list,
        description="image files (PNG, JPEG or WebP), each as base64 text: decoded as the "
        "image-folder loader reads images (8-bit gray or RGB, alpha dropped, values / 255)",
        json_schema_extra={"minItems": 1},
    )
    resize: StrictBool = Field(
        default=False,
        description="images only: resize each to the model's H×W (bilinear, aspect ratio not "
        "kept); unset or false, an image of another size is refused (also `?resize=true`)",
    )
    # strict: JSON's true or false only, never "yes" or 1
    return_probabilities: StrictBool = Field(
        default=False, description="add softmax probabilities (true or false)"
    )
    eps: Any = Field(
        default=None,
        description="the perturbation budget to answer at: one of the version's budget grid "
        "(`eps_grid` in GET /v2/models/{name}); a budget off the grid is refused with 422 "
        "(default: the served ε)",
        json_schema_extra={"type": "number", "exclusiveMinimum": 0},
    )


class PredictForm(_Strict):
    """A v1 body as a multipart form (`curl -F file=@shirt.png`)."""

    file: list[bytes] = Field(
        description="image files (PNG, JPEG or WebP), one part each, in batch order",
        json_schema_extra={"minItems": 1},
    )
    resize: bool = Field(
        default=False, description="resize each image to the model's H×W (bilinear)"
    )
    return_probabilities: bool = Field(default=False, description="add softmax probabilities")
    eps: float | None = Field(
        default=None, description="the budget to answer at, one of the version's grid"
    )


class PredictionItem(_Strict):
    label: int
    class_name: str
    probabilities: list[float] | None = None
    score: float = Field(description="the brittleness score computed by the served graph")
    eps: float = Field(description="the perturbation budget ε' answered (the threat model's norm)")
    threshold: float = Field(description="λ(ε'): the decision is brittle when score < λ")
    brittle: bool = Field(description="score < λ: a perturbation of size ε' likely flips it")
    borderline: bool = Field(description="|score − λ| ≤ the calibration's guard band")
    p_robust: float | None = Field(
        description="calibrated probability that no perturbation of size ε' flips the decision "
        "(null: the version was calibrated without it)"
    )
    margin_estimate: float | None = Field(
        description="estimated distance to the decision boundary, in the threat model's norm "
        "(the median margin of calibration points with this score)"
    )
    margin_interval: list[float | None] = Field(
        description="[low, high]: the margin lies in it with the calibrated probability "
        "(`margin_interval` in the model metadata, 0.8 by default)"
    )
    runner_up: int = Field(description="the class the decision is closest to flipping to")
    runner_up_class_name: str
    calibration_version: str


class PredictResponse(_Strict):
    model_name: str
    calibration_version: str
    predictions: list[PredictionItem]


# --- Open Inference Protocol v2 ------------------------------------------------------------


# The protocol's tensor datatypes that the service reads (the Open Inference Protocol's list less
# BYTES); `routes_v2.DTYPES` holds their numpy types.
Datatype = Literal["BOOL", "UINT8", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"]
# numpy's limit on an array's dimensions: a longer shape could never be reshaped into
MAX_DIMS = 64
INT64_MAX = 2**63 - 1
Dimension = Annotated[int, Field(ge=0, le=INT64_MAX)]


class InputParameters(_Open):
    binary_data_size: StrictInt | None = Field(
        default=None,
        ge=0,
        description="binary tensor data extension: the input's raw bytes follow the JSON header",
    )


class RequestInput(_Open):
    """One input tensor as the protocol states it. What a served model further requires (its
    input name, datatype and shape: `GET /v2/models/{name}`) is checked per request."""

    name: str
    shape: list[Dimension] = Field(max_length=MAX_DIMS)
    datatype: Datatype
    parameters: InputParameters = Field(default_factory=InputParameters)
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


OpenApiResponses = dict[int | str, dict[str, Any]]


def error_responses(statuses: Iterable[int]) -> OpenApiResponses:
    """OpenAPI's `responses` for error statuses: each one's body is an `ErrorResponse`."""
    return {status: {"model": ErrorResponse} for status in sorted(set(statuses))}


def request_body(model: type[BaseModel], media_types: Sequence[str]) -> dict[str, Any]:
    """`openapi_extra` documenting a body that the route reads itself: the request reader parses
    bodies, not FastAPI (a speed device, see `payload.py`), so FastAPI no longer sees the schema."""
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

    content = {media: {"schema": inline(schema)} for media in media_types}
    return {"requestBody": {"required": True, "content": content}}


def inference_route_docs(model: type[BaseModel], media_types: Sequence[str]) -> dict[str, Any]:
    """`openapi_extra` of an inference route: its body and its `{name}`, which the reader takes
    from the path by hand (`payload.model_name`), so FastAPI no longer declares it."""
    name = {
        "name": "name",
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
        "description": "the served model",
    }
    return {**request_body(model, media_types), "parameters": [name]}
