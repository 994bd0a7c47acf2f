"""Request and response models: the service's own REST API (v1) and the Open Inference Protocol
v2 subset. Bodies are parsed with orjson and then checked against these models; tensor data stay
`Any` here and become one numpy array in one call (`payload.py`), never element by element.
The bodies of the inference routes are documented by hand (`fastpath.request_body`).
"""

from __future__ import annotations

from collections.abc import Iterable
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


OpenApiResponses = dict[int | str, dict[str, Any]]


def error_responses(statuses: Iterable[int]) -> OpenApiResponses:
    """OpenAPI's `responses` for error statuses: each one's body is an `ErrorResponse`."""
    return {status: {"model": ErrorResponse} for status in sorted(set(statuses))}
