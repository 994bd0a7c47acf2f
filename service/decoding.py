"""From a body's bytes to a checked float32 batch: JSON parsing (`parse_json`), the schema check
with every problem named (`validate`), nested lists of numbers as one numpy array in one call
(`as_float32`), and the batch checks of every transport (`check_batch`: shape, size, NaN/Inf,
range). Each problem raises `InvalidInput` with a message that names it. The request reader
(`payload.py`) and the protocols' body formats (`routes_v1.py`, `routes_v2.py`, `grpc_convert.py`)
are built from these.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np
import orjson
from pydantic import BaseModel, ValidationError

from marginwatch.service.errors import InvalidInput

ModelT = TypeVar("ModelT", bound=BaseModel)


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


# A JSON token that numpy would turn into a number though it is none: `true`/`false`, or a
# string that starts like a number ("1.5", " -2"). Every body pays for searching its bytes for
# one (docs/benchmarks.md, "Strict tensors"); only a body holding one pays for the scan of its
# values below.
_QUOTED_NUMBER = re.compile(rb'"\s*[-+.0-9]')


def _may_hold_non_numbers(source: bytes) -> bool:
    """Whether `source` holds `true`, `false` or a quoted number. Three searches, not one
    regex of three alternatives: a literal first character lets `re` and `in` skip ahead,
    which made this 2.4× faster on a 64-image body (1.3 ms against 3.2 ms for 970 kB). Each
    word is looked for only if a letter of it that no number and no usual field name holds is
    there at all (`r` of `true`: "parameters" has one; `l` of `false`): a one-byte search is a
    `memchr`, about 30 times faster than a search for a word, and a one-image body is spared
    both word searches (11 µs → 3 µs for a one-image v2 body on the shared 2-core machine)."""
    return (
        (b"r" in source and b"true" in source)
        or (b"l" in source and b"false" in source)
        or _QUOTED_NUMBER.search(source) is not None
    )


def as_float32(data: Any, what: str, source: bytes = b"") -> np.ndarray:
    """Nested lists of numbers as one float32 array (numpy's C loop, not element by element).
    `source` is the JSON text `data` came from: where it holds a boolean or a numeric string,
    the values are checked to be numbers, which numpy alone would convert silently."""
    if isinstance(data, np.ndarray):
        return data
    try:
        # a number beyond float32's range becomes inf, which `check_batch` refuses; numpy's
        # warning about it would only be log noise that any client can cause
        with np.errstate(over="ignore"):
            array = np.asarray(data, dtype=np.float32)
    except (ValueError, TypeError):
        raise InvalidInput(
            f"{what} must be numbers in nested lists of equal lengths (a regular array)"
        ) from None
    if _may_hold_non_numbers(source) and not _only_numbers(data, array.ndim):
        raise InvalidInput(f"{what} must hold numbers only: no strings, booleans or null")
    return array


def _only_numbers(data: Any, depth: int) -> bool:
    """Whether every leaf of the regular nested list `data` (`depth` levels) is an int or a
    float, booleans excluded (Python's bool is an int)."""
    leaves = data if isinstance(data, list) else [data]
    for _ in range(depth - 1):
        leaves = list(itertools.chain.from_iterable(leaves))
    kinds = set(map(type, leaves))
    return kinds <= {int, float}


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
