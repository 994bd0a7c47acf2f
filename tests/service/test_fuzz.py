"""Fuzzers: nothing a client sends gets a 5xx.

- schemathesis against a live server's `/openapi.json`: every operation, deterministic, with the
  checks for server errors and for responses that the document does not describe.
- hypothesis against the v2 binary framing (`Inference-Header-Content-Length`, the JSON header,
  the raw tensor bytes), in process: the parser returns a valid batch or raises `InvalidInput`
  (a 400), never anything else.

`make test` runs both briefly; `make fuzz` runs them at length (`FUZZ_EXAMPLES`, examples per
operation for schemathesis; hypothesis runs ten times as many per property).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import httpx
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from starlette.datastructures import Headers

from marginwatch.artifact.graph import INPUT_NAME
from marginwatch.service.decoding import check_batch
from marginwatch.service.errors import InvalidInput
from marginwatch.service.routes_v2 import DTYPES, HEADER_LENGTH, OUTPUT_NAMED, decode_infer

if TYPE_CHECKING:
    from conftest import ServerFactory

MODEL = "fmnist"
# The parser does not depend on the model: a small sample shape lets hypothesis reach valid
# batches often (and quickly)
SAMPLE_SHAPE = (1, 2, 3)
SAMPLE_VALUES = 6
MAX_INPUTS = 4
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "25"))
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
)


# --- schemathesis against the live server ----------------------------------------------------


def requests_by_status_class(url: str) -> dict[str, float]:
    """Requests the server counted, summed over models and endpoints, by status class."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "marginwatch_requests_total":
                status = sample.labels["status_class"]
                counts[status] = counts.get(status, 0.0) + sample.value
    return counts


def test_schemathesis_finds_no_server_error_and_no_undocumented_response(
    store: Path, spawn_server: ServerFactory, tmp_path: Path
) -> None:
    # the model's name is fixed: a generated one only ever reaches the 404
    config = tmp_path / "schemathesis.toml"
    config.write_text(f'[parameters]\n"path.name" = "{MODEL}"\n')
    report = tmp_path / "report.json"
    with spawn_server(store, tmp_path / "logs", models=MODEL, reload_interval_s="0") as server:
        command = [
            sys.executable, "-m", "schemathesis.cli", "--config-file", str(config),
            "run", f"{server.url}/openapi.json", "--checks", ",".join(CHECKS),
            "--max-examples", str(EXAMPLES), "--generation-deterministic",  # no example database
            "--workers", "1", "--no-color",
            "--report", "json", "--report-json-path", str(report),
        ]  # fmt: skip
        # in tmp_path: schemathesis writes nothing into the checkout
        run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, check=False)
        answered = requests_by_status_class(server.url)
        log = server.log_text()
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-2000:]
    result = json.loads(report.read_text())
    assert result["failures"] == [] and result["errors"] == []
    assert result["operations"]["tested"] == result["operations"]["total"] == 8
    assert answered.get("5xx", 0) == 0, answered
    assert " ERROR " not in log and "Traceback" not in log, log[-4000:]
    print(
        f"\nschemathesis: {result['test_cases']['generated']} test cases, "
        f"{sum(answered.values()):.0f} requests answered, {answered.get('5xx', 0):.0f} × 5xx, "
        f"{len(result['failures'])} check failures"
    )


# --- hypothesis against the v2 binary framing, in process -------------------------------------

fuzz = settings(
    max_examples=10 * EXAMPLES,
    derandomize=True,  # the same examples on every run: no flaky failures in `make test`
    database=None,
    deadline=None,  # the machine is shared: time is not a property here
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
latin1 = st.characters(max_codepoint=255)  # a header's bytes as Starlette decodes them
header_values = st.one_of(
    st.none(),
    st.integers(-5, 5000).map(str),
    st.text(alphabet="0123456789 \t²³¹", max_size=8),
    st.text(alphabet=latin1, max_size=12),
    st.integers(4290, 4400).map(lambda digits: "9" * digits),
)
dimensions = st.one_of(
    st.sampled_from([0, 1, 2, 3, 6, 2**31, 2**32, 2**62, 2**63 - 1, 2**63, 2**64]),
    st.integers(-3, 2**70),
)
shapes = st.one_of(
    st.lists(dimensions, max_size=6),
    st.integers(60, 70).map(lambda dims: [1] * dims),
    st.integers(1, 3).map(lambda n: [n, *SAMPLE_SHAPE]),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=12,
)
pixels = st.floats(-0.5, 1.5, width=32) | st.sampled_from([0.0, 1.0, float("nan"), float("inf")])


T = TypeVar("T")


def mostly(draw: st.DrawFn, right: T, wrong: st.SearchStrategy[T]) -> T:
    """`right` three times in four: a request must be nearly valid for the parser to reach its
    later checks (the reshape, the batch checks)."""
    return right if draw(st.integers(0, 3)) else draw(wrong)


@st.composite
def tensors(draw: st.DrawFn) -> tuple[dict[str, object], bytes]:
    """One input's JSON entry, and the raw bytes it brings when it uses binary data."""
    shape = draw(shapes)
    declared = math.prod(shape)  # as many values, or none where that is too many to send
    most = 3 * SAMPLE_VALUES
    count = mostly(draw, declared if 0 <= declared <= most else 0, st.integers(0, most))
    values = draw(st.lists(pixels, min_size=count, max_size=count))
    entry: dict[str, object] = {
        "name": mostly(draw, INPUT_NAME, st.text(max_size=4)),
        "shape": shape,
        "datatype": mostly(draw, "FP32", st.sampled_from([*DTYPES, "BYTES"]) | st.text(max_size=4)),
    }
    raw = b""
    if draw(st.booleans()):
        raw = mostly(draw, np.float32(values).tobytes(), st.binary(max_size=64))
        entry["parameters"] = {"binary_data_size": mostly(draw, len(raw), json_values)}
    else:
        entry["data"] = mostly(draw, values, json_values)
    return entry, raw


@st.composite
def framed_requests(draw: st.DrawFn) -> tuple[bytes, str | None]:
    """A v2 request as the wire carries it: body and `Inference-Header-Content-Length`."""
    inputs = mostly(draw, [draw(tensors())], st.lists(tensors(), max_size=3))
    document: dict[str, object] = {"inputs": [entry for entry, _ in inputs]}
    if draw(st.booleans()):
        names = st.sampled_from(sorted(OUTPUT_NAMED)) | json_values
        document["outputs"] = draw(st.lists(st.fixed_dictionaries({"name": names})))
    # stdlib json: it writes integers beyond 64 bits and NaN, which orjson will not
    header = json.dumps(document).encode()
    body = header + b"".join(raw for _, raw in inputs)
    binary = any("parameters" in entry for entry, _ in inputs)
    near = st.integers(-2, 2).map(lambda offset: str(len(header) + offset))
    return body, mostly(draw, str(len(header)) if binary else None, near | header_values)


def parse(body: bytes, header_length: str | None) -> np.ndarray | None:
    """The batch the service would serve, or None where it answers `InvalidInput` (400); any
    other exception fails the test."""
    raw = (
        [] if header_length is None else [(HEADER_LENGTH.encode(), header_length.encode("latin1"))]
    )
    try:
        x, _ = decode_infer(body, Headers(raw=raw))
        batch = check_batch(
            x, input_shape=SAMPLE_SHAPE, input_range=(0.0, 1.0), max_inputs=MAX_INPUTS
        )
    except InvalidInput:
        return None
    assert batch.dtype == np.float32 and batch.flags.c_contiguous
    assert batch.shape[1:] == SAMPLE_SHAPE and 1 <= len(batch) <= MAX_INPUTS
    assert np.isfinite(batch).all() and batch.min() >= 0.0 and batch.max() <= 1.0
    return batch


@fuzz
@given(body=st.binary(max_size=512), header_length=header_values)
def test_arbitrary_bytes_are_a_batch_or_invalid_input(
    body: bytes, header_length: str | None
) -> None:
    parse(body, header_length)


@fuzz
@given(request=framed_requests())
def test_framed_requests_are_a_batch_or_invalid_input(request: tuple[bytes, str | None]) -> None:
    parse(*request)


@fuzz
@given(
    batch=st.integers(1, MAX_INPUTS).flatmap(
        lambda n: st.lists(
            st.floats(0, 1, width=32), min_size=n * SAMPLE_VALUES, max_size=n * SAMPLE_VALUES
        )
    ),
    binary=st.booleans(),
    cut=st.integers(0, 64),
    flips=st.lists(st.tuples(st.integers(0, 10**4), st.integers(0, 255)), max_size=3),
)
def test_valid_requests_round_trip_and_damaged_ones_are_invalid_input(
    batch: list[float], binary: bool, cut: int, flips: list[tuple[int, int]]
) -> None:
    """A valid request gives back exactly its pixels; the same bytes cut short or with bytes
    overwritten give a batch or `InvalidInput`."""
    pixels = np.float32(batch).reshape(-1, *SAMPLE_SHAPE)
    tensor: dict[str, object] = {"name": INPUT_NAME, "datatype": "FP32"}
    tensor["shape"] = list(pixels.shape)
    raw = pixels.tobytes() if binary else b""
    if binary:
        tensor["parameters"] = {"binary_data_size": len(raw)}
    else:
        tensor["data"] = pixels.ravel().tolist()
    header = json.dumps({"inputs": [tensor]}).encode()
    declared = str(len(header)) if binary else None
    parsed = parse(header + raw, declared)
    assert parsed is not None and np.array_equal(parsed, pixels)
    damaged = bytearray(header + raw)[: len(header) + len(raw) - cut]
    for position, value in flips:
        if damaged:
            damaged[position % len(damaged)] = value
    parse(bytes(damaged), declared)
