"""Request bodies: size limit, content type, JSON parsing with orjson, and the conversion of
nested arrays into one validated float32 batch. Every problem raises a domain error whose message
names it; nothing here computes a prediction."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np
import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from marginwatch.service.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType

ModelT = TypeVar("ModelT", bound=BaseModel)
JSON = "application/json"
OCTET_STREAM = "application/octet-stream"


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


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The body, refused early from Content-Length and again while streaming if it is larger."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(f"the body has {declared} bytes; the limit is {max_bytes}")
    chunks: list[bytes] = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > max_bytes:
            raise PayloadTooLarge(f"the body exceeds the limit of {max_bytes} bytes")
        chunks.append(chunk)
    if not received:
        raise InvalidInput("the request body is empty")
    return b"".join(chunks)


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
