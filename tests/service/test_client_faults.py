"""Client faults are the client's: a malformed v2 framing is a 400 naming the problem, never a
500; the OpenAPI document refuses what validation refuses; a client that disconnects mid-body is
counted as a disconnect (status 499), not as a server error, and logged without a traceback."""

from __future__ import annotations

import socket
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import jsonschema_rs
import numpy as np
import orjson
import pytest
from starlette.datastructures import Headers

from marginwatch.service.decoding import check_batch, validate
from marginwatch.service.errors import InvalidInput
from marginwatch.service.routes_v1 import decode_predict
from marginwatch.service.routes_v2 import DTYPES, HEADER_LENGTH, decode_infer
from marginwatch.service.schemas import InferenceRequest
from metrics_text import scrape, total

if TYPE_CHECKING:
    from conftest import Server, ServerFactory

MODEL = "fmnist"
API_KEY = "test-key-0123456789"  # conftest's
V2 = f"/v2/models/{MODEL}/infer"


def v2_body(shape: list[int], data: object) -> bytes:
    return orjson.dumps({"inputs": [{"name": "input", "shape": shape, "datatype": "FP32",
                                     "data": data}]})  # fmt: skip


# (id, body, Inference-Header-Content-Length as the wire carries it, words the message must have);
# each one raised something other than InvalidInput before, and was answered 500
EDGE_CASES: list[tuple[str, bytes, bytes | None, str]] = [
    # "²" passes `str.isdigit`, and `int` refuses it
    ("header-length-superscript-digit", b"{}", "²".encode("latin-1"), "must be an integer"),
    ("header-length-5000-digits", b"{}", b"9" * 5000, "the body has 2 bytes"),
    # np.prod wrapped around to 0, which matched the empty data, and the reshape raised
    ("shape-product-beyond-int64", v2_body([2**32, 2**32], []), None,
     "(18446744073709551616 values) but carries 0 values"),
    ("shape-of-no-values-beyond-int64", v2_body([0, 2**62, 2**62], []), None, "holds no values"),
    ("shape-65-dimensions", v2_body([1] * 65, [0.5]), None, "at most 64 items"),
]  # fmt: skip
EDGE_IDS = [case[0] for case in EDGE_CASES]


@pytest.mark.parametrize("case", EDGE_CASES, ids=EDGE_IDS)
def test_edge_case_raises_invalid_input(case: tuple[str, bytes, bytes | None, str]) -> None:
    _, body, header_length, words = case
    raw = [] if header_length is None else [(HEADER_LENGTH.encode(), header_length)]
    with pytest.raises(InvalidInput, match=words.replace("(", r"\(").replace(")", r"\)")):
        decode_infer(body, Headers(raw=raw))


@pytest.mark.parametrize("case", EDGE_CASES, ids=EDGE_IDS)
def test_edge_case_is_answered_400(
    client: httpx.Client, case: tuple[str, bytes, bytes | None, str]
) -> None:
    _, body, header_length, words = case
    headers: dict[str, str | bytes] = {"Content-Type": "application/json"}
    if header_length is not None:
        headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: header_length}
    response = client.post(V2, content=body, headers=headers)
    assert response.status_code == 400, response.text
    assert words in response.json()["error"]


@pytest.mark.parametrize(
    ("decode", "body"),
    [(decode_predict, orjson.dumps({"inputs": [[[[3.5e38]]]]})),
     (decode_infer, v2_body([1, 1, 1, 1], [3.5e38]))],
    ids=["v1", "v2"],
)  # fmt: skip
def test_numbers_beyond_float32_are_refused_without_a_warning(
    decode: Callable[[bytes, Headers], tuple[np.ndarray, object]], body: bytes
) -> None:
    """They become inf and are refused as such; numpy's overflow warning is no server error,
    but it was log noise any client could cause (and an exception where warnings are errors)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x, _ = decode(body, Headers())
        with pytest.raises(InvalidInput, match="NaN or infinite"):
            check_batch(x, input_shape=[1, 1, 1], input_range=(0.0, 1.0), max_inputs=1)


# --- the OpenAPI document states what validation enforces ------------------------------------


def request_schema(openapi: dict[str, Any], path: str) -> dict[str, Any]:
    schema: dict[str, Any] = openapi["paths"][path]["post"]["requestBody"]["content"][
        "application/json"
    ]["schema"]
    return schema


def v2_document(**tensor: object) -> dict[str, object]:
    return {"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", "data": [0.5]} | tensor]}


# (id, document, whether validation accepts it)
DOCUMENTS: list[tuple[str, dict[str, object], bool]] = [
    ("valid", v2_document(), True),
    ("no-inputs", {"inputs": []}, False),
    ("negative-dimension", v2_document(shape=[2, -1]), False),
    ("zero-dimension", v2_document(shape=[0, 1]), True),
    ("64-dimensions", v2_document(shape=[1] * 64), True),
    ("65-dimensions", v2_document(shape=[1] * 65), False),
    ("largest-int64-dimension", v2_document(shape=[2**63 - 1]), True),
    ("dimension-beyond-int64", v2_document(shape=[2**63]), False),
    ("datatype-fp16", v2_document(datatype="FP16"), True),
    ("datatype-bytes", v2_document(datatype="BYTES"), False),
    ("datatype-lower-case", v2_document(datatype="fp32"), False),
    ("binary-size-0", v2_document(parameters={"binary_data_size": 0}), True),
    ("binary-size-negative", v2_document(parameters={"binary_data_size": -1}), False),
    ("binary-size-boolean", v2_document(parameters={"binary_data_size": True}), False),
    ("binary-size-text", v2_document(parameters={"binary_data_size": "8"}), False),
    ("other-parameters", v2_document(parameters={"content_type": "x"}), True),
]


@pytest.fixture(scope="module")
def openapi(server: Server) -> dict[str, Any]:
    # behind the key, as the server has API keys (`public_docs` is off)
    headers = {"X-API-Key": API_KEY}
    document: dict[str, Any] = httpx.get(f"{server.url}/openapi.json", headers=headers).json()
    return document


@pytest.mark.parametrize("case", DOCUMENTS, ids=[case[0] for case in DOCUMENTS])
def test_openapi_request_schema_agrees_with_validation(
    openapi: dict[str, Any], case: tuple[str, dict[str, object], bool]
) -> None:
    _, document, valid = case
    schema = request_schema(openapi, "/v2/models/{name}/infer")
    assert jsonschema_rs.validator_for(schema).is_valid(document) is valid
    if valid:
        validate(InferenceRequest, document)
    else:
        with pytest.raises(InvalidInput):
            validate(InferenceRequest, document)


def test_openapi_states_the_limits_the_service_enforces(openapi: dict[str, Any]) -> None:
    v1 = request_schema(openapi, "/v1/models/{name}/predict")
    assert v1["properties"]["inputs"]["minItems"] == 1  # `check_batch` refuses an empty batch
    tensor = request_schema(openapi, "/v2/models/{name}/infer")["properties"]["inputs"]["items"]
    assert sorted(tensor["properties"]["datatype"]["enum"]) == sorted(DTYPES)
    headers = [p for p in openapi["paths"]["/v2/models/{name}/infer"]["post"]["parameters"]
               if p["in"] == "header"]  # fmt: skip
    assert [(p["name"], p["schema"]) for p in headers] == [
        (HEADER_LENGTH, {"type": "integer", "minimum": 1})
    ]


# --- a client that disconnects mid-body --------------------------------------------------------


def scrape_counts(url: str) -> tuple[dict[str, float], float]:
    """Requests by status class (summed over models and endpoints), and disconnects."""
    samples = scrape(url)
    classes = {
        dict(labels)["status_class"]
        for name, labels in samples
        if name == "marginwatch_requests_total"
    }
    by_class = {
        status: total(samples, "marginwatch_requests_total", status_class=status)
        for status in classes
    }
    return by_class, total(samples, "marginwatch_client_disconnects_total")


def send_half_and_hang_up(url: str, path: str) -> None:
    """Headers that announce 100,000 bytes, the first 1,000 of them, and the socket closed."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as connection:
        connection.sendall(
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            "Content-Length: 100000\r\n\r\n".encode()
            + b'{"inputs": ['
            + b"0.5, " * 198
        )


def test_client_disconnects_mid_body_are_counted_apart_and_not_errors(
    store: Path, spawn_server: ServerFactory, tmp_path: Path
) -> None:
    times = 20
    with spawn_server(store, tmp_path, models=MODEL, reload_interval_s="0") as server:
        before, _ = scrape_counts(server.url)
        for index in range(times):
            send_half_and_hang_up(server.url, V2 if index % 2 else f"/v1/models/{MODEL}/predict")
        # the server notices each close on its next read: wait until it has seen them all (the
        # bound is only a way out should it never, not a timing)
        give_up = time.monotonic() + 120
        while (counts := scrape_counts(server.url))[1] < times and time.monotonic() < give_up:
            time.sleep(0.05)
        after, disconnects = counts
        log = server.log_text()
    assert disconnects == times
    assert after.get("5xx", 0) == 0
    assert after.get("4xx", 0) - before.get("4xx", 0) == times  # their 499s
    assert " ERROR " not in log and "Traceback" not in log, log
    assert log.count("INFO marginwatch.service: client disconnected") == times
