"""The one request reader of both inference APIs, and the checks it is made of.

`RequestReader.read` takes an inference request from the path to one validated float32 batch:
the model's deployment, the Content-Type, the size limit (from Content-Length, and again while
streaming), the protocol's own decoding (a `BodyFormat`: orjson plus the pydantic model, or the
binary tensor extension) and the batch checks (shape, size, NaN/Inf, range). Every problem
raises a domain error whose message names it; nothing here computes a prediction.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np
import orjson
from pydantic import BaseModel, ValidationError
from starlette.datastructures import Headers
from starlette.requests import Request

from marginwatch.service.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from marginwatch.service.fastpath import model_name
from marginwatch.service.registry import Deployment, ModelRegistry

ModelT = TypeVar("ModelT", bound=BaseModel)
OptionsT = TypeVar("OptionsT")
JSON = "application/json"
OCTET_STREAM = "application/octet-stream"


@dataclass(frozen=True)
class BodyFormat(Generic[OptionsT]):
    """One protocol's request body: the media types it comes in, and `decode(body, headers)`,
    which returns the input array (not yet checked) and the request's options."""

    media_types: tuple[str, ...]
    decode: Callable[[bytes, Headers], tuple[np.ndarray, OptionsT]]
    what: str = "inputs"  # how error messages name the input


@dataclass(frozen=True)
class RequestReader:
    """Reads an inference request; one per app, shared by the v1 and v2 routes."""

    registry: ModelRegistry
    max_body_bytes: int
    max_inputs: int

    async def read(
        self, request: Request, body_format: BodyFormat[OptionsT]
    ) -> tuple[Deployment, np.ndarray, OptionsT]:
        """The deployment that serves the request's model, its validated float32 batch and
        its options. Only the batch comes back: the body and what was parsed from it are freed
        before the caller waits for its batch (see `fastpath.py`)."""
        name = model_name(request)
        self.registry.get(name)  # an unknown or unready model is refused before the body is read
        check_content_type(request, body_format.media_types)
        limit = self.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"the body has {declared} bytes; the limit is {limit}")
        chunks: list[bytes] = []
        received = 0
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise PayloadTooLarge(f"the body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
        if not received:
            raise InvalidInput("the request body is empty")
        # looked up again: a reload may have swapped the version while the body streamed in, and
        # the batch must fit the version that will serve it
        deployment = self.registry.get(name)
        record = deployment.model.record
        x, options = body_format.decode(b"".join(chunks), request.headers)
        x = check_batch(
            x,
            input_shape=record.input_shape,
            input_range=record.input_range,
            max_inputs=self.max_inputs,
            what=body_format.what,
        )
        return deployment, x, options


def check_content_type(request: Request, allowed: Sequence[str]) -> None:
    """A missing Content-Type is accepted (several OIP clients send none); a wrong one is not."""
    header = request.headers.get("content-type")
    if header is None:
        return
    media_type = header.split(";", 1)[0].strip().lower()
    if media_type not in allowed:
        raise UnsupportedMediaType(
            f"Content-Type {media_type!r} is not accepted here; send {' or '.join(allowed)}"
        )


def parse_json(raw: bytes | memoryview) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise InvalidInput(f"the body is not valid JSON: {error}") from None


def validate(schema: type[ModelT], document: Any) -> ModelT:
    """`document` checked against `schema`; the message lists each problem with its location."""
    try:
        return schema.model_validate(document)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in problem['loc']) or 'body'}: {problem['msg']}"
            for problem in error.errors(include_url=False)
        )
        raise InvalidInput(f"invalid request: {problems}") from None


def as_float32(data: Any, what: str) -> np.ndarray:
    """Nested lists of numbers as one float32 array (numpy's C loop, not element by element)."""
    if isinstance(data, np.ndarray):
        return data
    try:
        array = np.asarray(data, dtype=np.float32)
    except (ValueError, TypeError):
        raise InvalidInput(
            f"{what} must be numbers in nested lists of equal lengths (a regular array)"
        ) from None
    return array


def check_batch(
    x: np.ndarray,
    *,
    input_shape: Sequence[int],
    input_range: tuple[float, float],
    max_inputs: int,
    what: str = "inputs",
) -> np.ndarray:
    """`x` as a C-contiguous float32 batch N×`input_shape`, finite, inside `input_range`."""
    expected = [*input_shape]
    if x.ndim >= 1 and len(x) == 0:
        raise InvalidInput(f"{what} is an empty batch: send at least one sample")
    if x.ndim != len(expected) + 1 or list(x.shape[1:]) != expected:
        raise InvalidInput(
            f"{what} must have shape [N, {', '.join(map(str, expected))}]; got {list(x.shape)}"
        )
    if len(x) > max_inputs:
        raise InvalidInput(f"{what} holds {len(x)} samples; the limit is {max_inputs} per request")
    low, high = input_range
    finite_low, finite_high = float(x.min()), float(x.max())
    if not (math.isfinite(finite_low) and math.isfinite(finite_high)):
        raise InvalidInput(f"{what} contains NaN or infinite values")
    if finite_low < low or finite_high > high:
        raise InvalidInput(
            f"{what} has values in [{finite_low:g}, {finite_high:g}], outside the model's input "
            f"range [{low:g}, {high:g}]"
        )
    return np.ascontiguousarray(x, dtype=np.float32)
