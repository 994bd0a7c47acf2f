"""Bad input against the running server: a 4xx naming the problem, then the server still serves.
And one test per status code the service answers with."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import httpx
import numpy as np
import orjson
import pytest

if TYPE_CHECKING:
    from conftest import Server

MODEL = "fmnist"
V1 = f"/v1/models/{MODEL}/predict"
V2 = f"/v2/models/{MODEL}/infer"
API_KEY = "test-key-0123456789"
JSON_TYPE = {"Content-Type": "application/json"}
IMAGE = np.full((1, 28, 28), 0.5, dtype=np.float32)


def v1_body(batch: object, **extra: object) -> bytes:
    return orjson.dumps({"inputs": batch, **extra})


def v2_body(shape: list[int], data: object, datatype: str = "FP32", name: str = "input") -> bytes:
    return orjson.dumps(
        {"inputs": [{"name": name, "shape": shape, "datatype": datatype, "data": data}]}
    )


def images(count: int, value: float = 0.5) -> list[object]:
    return np.full((count, 1, 28, 28), value, dtype=np.float32).tolist()


def binary_request(
    array: np.ndarray, shape: list[int] | None = None
) -> tuple[bytes, dict[str, str]]:
    raw = array.astype("<f4").tobytes()
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": shape or list(array.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        }
    )
    return header + raw, {"Inference-Header-Content-Length": str(len(header))}


def _nan_binary() -> tuple[bytes, dict[str, str]]:
    array = np.full((1, 1, 28, 28), 0.5, dtype=np.float32)
    array[0, 0, 3, 3] = np.nan
    return binary_request(array)


def _inf_binary(sign: float) -> tuple[bytes, dict[str, str]]:
    array = np.full((1, 1, 28, 28), 0.5, dtype=np.float32)
    array[0, 0, 0, 0] = sign * np.inf
    return binary_request(array)


ragged = [images(1)[0], [[[0.5] * 27] * 28]]
one_json = IMAGE.tolist()
# (id, path, body, extra headers, status, words the message must contain)
BAD: list[tuple[str, str, bytes, dict[str, str], int, str]] = [
    ("v1-invalid-json", V1, b'{"inputs": [', JSON_TYPE, 400, "not valid JSON"),
    ("v2-invalid-json", V2, b"{inputs}", JSON_TYPE, 400, "not valid JSON"),
    ("v1-json-nan-literal", V1, b'{"inputs": [NaN]}', JSON_TYPE, 400, "not valid JSON"),
    ("v1-empty-body", V1, b"", JSON_TYPE, 400, "empty"),
    ("v1-wrong-content-type", V1, v1_body([one_json]), {"Content-Type": "text/plain"}, 415,
     "Content-Type"),
    ("v2-wrong-content-type", V2, v2_body([1, 1, 28, 28], IMAGE.ravel().tolist()),
     {"Content-Type": "application/x-www-form-urlencoded"}, 415, "Content-Type"),
    ("v1-missing-inputs", V1, orjson.dumps({"return_probabilities": True}), JSON_TYPE, 400,
     "inputs: Field required"),
    ("v1-unknown-field", V1, v1_body([one_json], input=1), JSON_TYPE, 400, "input: Extra inputs"),
    ("v1-not-an-object", V1, b"[1, 2]", JSON_TYPE, 400, "invalid request"),
    ("v2-missing-shape", V2, orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32",
     "data": [0.5]}]}), JSON_TYPE, 400, "inputs.0.shape: Field required"),
    ("v2-missing-inputs", V2, orjson.dumps({"id": "x"}), JSON_TYPE, 400, "inputs: Field required"),
    ("v1-wrong-rank", V1, v1_body(np.full((2, 28, 28), 0.5).tolist()), JSON_TYPE, 400,
     "shape [N, 1, 28, 28]; got [2, 28, 28]"),
    ("v1-wrong-shape", V1, v1_body(np.full((1, 1, 28, 27), 0.5).tolist()), JSON_TYPE, 400,
     "got [1, 1, 28, 27]"),
    ("v1-ragged", V1, v1_body(ragged), JSON_TYPE, 400, "regular array"),
    ("v2-wrong-shape", V2, v2_body([1, 1, 27, 29], [0.5] * 783), JSON_TYPE, 400,
     "got [1, 1, 27, 29]"),
    ("v1-strings", V1, v1_body([[[["a"] * 28] * 28]]), JSON_TYPE, 400, "numbers"),
    ("v2-wrong-datatype", V2, v2_body([1, 1, 28, 28], [1] * 784, "INT32"), JSON_TYPE, 400,
     "datatype FP32"),
    ("v2-wrong-input-name", V2, v2_body([1, 1, 28, 28], [0.5] * 784, name="x"), JSON_TYPE, 400,
     "one input named 'input'"),
    ("v2-shape-data-mismatch", V2, v2_body([2, 1, 28, 28], [0.5] * 784), JSON_TYPE, 400,
     "declares shape [2, 1, 28, 28] (1568 values) but carries 784"),
    ("v2-unknown-output", V2, orjson.dumps({**orjson.loads(v2_body([1, 1, 28, 28], [0.5] * 784)),
     "outputs": [{"name": "features"}]}), JSON_TYPE, 400, "unknown output 'features'"),
    ("v2-binary-nan", V2, *_nan_binary(), 400, "NaN or infinite"),
    ("v2-binary-inf", V2, *_inf_binary(1.0), 400, "NaN or infinite"),
    ("v2-binary-minus-inf", V2, *_inf_binary(-1.0), 400, "NaN or infinite"),
    ("v1-json-overflow-inf", V1, b'{"inputs": [[[[1e999]]]]}', JSON_TYPE, 400, ""),
    ("v1-above-range", V1, v1_body(images(1, 1.5)), JSON_TYPE, 400,
     "outside the model's input range [0, 1]"),
    ("v1-below-range", V1, v1_body(images(1, -0.1)), JSON_TYPE, 400, "outside the model's input"),
    ("v1-empty-batch", V1, v1_body([]), JSON_TYPE, 400, "empty batch"),
    ("v2-empty-batch", V2, v2_body([0, 1, 28, 28], []), JSON_TYPE, 400, "empty batch"),
    ("v1-batch-above-limit", V1, v1_body(images(65)), JSON_TYPE, 400,
     "holds 65 samples; the limit is 64"),
    ("v2-binary-bad-header-length", V2, b"{}", {"Inference-Header-Content-Length": "x"}, 400,
     "must be an integer"),
    ("v2-binary-header-length-too-long", V2, b"{}", {"Inference-Header-Content-Length": "99"},
     400, "the body has 2 bytes"),
    ("v2-binary-size-mismatch", V2, *binary_request(np.zeros((1, 1, 28, 28)), [2, 1, 28, 28]),
     400, "carries 784 values"),
    ("v2-binary-trailing-bytes", V2, binary_request(np.zeros((1, 1, 28, 28)))[0] + b"xx",
     {"Inference-Header-Content-Length": binary_request(np.zeros((1, 1, 28, 28)))[1][
         "Inference-Header-Content-Length"]}, 400, "2 binary bytes"),
    ("v1-body-above-limit", V1, b" " * (1 << 20) + b"{}", JSON_TYPE, 413, "limit"),
    # numpy turns these into numbers; the service does not
    ("v1-numeric-strings", V1, v1_body([[[["0.5"] * 28] * 28]]), JSON_TYPE, 400, "numbers only"),
    ("v1-one-numeric-string", V1, v1_body([[[[0.5] * 27 + [" 1"]] * 28]]), JSON_TYPE, 400,
     "numbers only"),
    ("v1-booleans", V1, v1_body([[[[True] * 28] * 28]]), JSON_TYPE, 400, "numbers only"),
    ("v1-one-boolean", V1, v1_body([[[[0.5] * 27 + [False]] + [[0.5] * 28] * 27]]), JSON_TYPE,
     400, "numbers only"),
    ("v2-numeric-strings", V2, v2_body([1, 1, 28, 28], ["0.5"] * 784), JSON_TYPE, 400,
     "numbers only"),
    ("v2-one-boolean", V2, v2_body([1, 1, 28, 28], [0.5] * 783 + [True]), JSON_TYPE, 400,
     "numbers only"),
    ("v1-flag-not-boolean", V1, v1_body([one_json], return_probabilities="yes"), JSON_TYPE, 400,
     "return_probabilities: Input should be a valid boolean"),
    ("v1-flag-number", V1, v1_body([one_json], return_probabilities=1), JSON_TYPE, 400,
     "return_probabilities"),
    ("v2-repeated-output", V2, orjson.dumps({**orjson.loads(v2_body([1, 1, 28, 28], [0.5] * 784)),
     "outputs": [{"name": "logits"}, {"name": "label"}, {"name": "logits"}]}), JSON_TYPE, 400,
     "output 'logits' is asked for more than once"),
]  # fmt: skip


def assert_still_serving(client: httpx.Client) -> None:
    response = client.post(V1, content=v1_body([one_json]), headers=JSON_TYPE)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("case", BAD, ids=[case[0] for case in BAD])
def test_bad_input_is_refused_with_a_reason(
    client: httpx.Client, case: tuple[str, str, bytes, dict[str, str], int, str]
) -> None:
    _, path, body, headers, status, words = case
    response = client.post(path, content=body, headers=headers)
    assert response.status_code == status, response.text
    assert words in response.json()["error"]
    assert_still_serving(client)


def test_body_above_limit_without_content_length(client: httpx.Client) -> None:
    """A chunked body gives no Content-Length: the limit applies while reading."""

    def chunks() -> Iterator[bytes]:
        for _ in range(20):
            yield b" " * 65536

    response = client.post(V1, content=chunks(), headers=JSON_TYPE)
    assert response.status_code == 413
    assert "exceeds the limit" in response.json()["error"]
    assert_still_serving(client)


@pytest.mark.parametrize("path", [V1, f"/v2/models/{MODEL}", "/v2"])
@pytest.mark.parametrize(
    "headers",
    [{}, {"X-API-Key": "wrong-key-0000"}, {"Authorization": "Bearer wrong-key-0000"},
     {"Authorization": f"Basic {API_KEY}"}],
    ids=["missing", "wrong-x-api-key", "wrong-bearer", "not-bearer"],
)  # fmt: skip
def test_401_without_a_valid_api_key(server: Server, path: str, headers: dict[str, str]) -> None:
    url = server.url + path
    response = httpx.request("POST" if path == V1 else "GET", url, headers=headers)
    assert response.status_code == 401
    assert "API key" in response.json()["error"]
    assert response.headers["WWW-Authenticate"] == "Bearer"


def test_bearer_key_accepted_and_health_metrics_open(server: Server) -> None:
    url = server.url
    bearer = {"Authorization": f"Bearer {API_KEY}", **JSON_TYPE}
    assert httpx.post(url + V1, content=v1_body([one_json]), headers=bearer).status_code == 200
    assert httpx.get(url + "/v2/health/live").status_code == 200
    assert httpx.get(url + "/metrics").status_code == 200


@pytest.mark.parametrize(
    "path", ["/v1/models/nope/predict", "/v2/models/nope/infer", "/v2/models/nope",
             "/v2/models/nope/ready"],
)  # fmt: skip
def test_404_unknown_model(client: httpx.Client, path: str) -> None:
    method = "POST" if path.endswith(("predict", "infer")) else "GET"
    response = client.request(method, path, content=v1_body([one_json]), headers=JSON_TYPE)
    assert response.status_code == 404
    assert "no model named 'nope'" in response.json()["error"]
    assert_still_serving(client)


def test_503_model_not_ready(client: httpx.Client) -> None:
    """`pending` is configured but has no published version."""
    for method, path in [
        ("GET", "/v2/models/pending/ready"),
        ("POST", "/v1/models/pending/predict"),
        ("GET", "/v2/health/ready"),
    ]:
        response = client.request(method, path, content=v1_body([one_json]), headers=JSON_TYPE)
        assert response.status_code == 503, path
        assert "pending" in response.json()["error"]
    assert client.get(f"/v2/models/{MODEL}/ready").status_code == 200


def test_200_and_405(client: httpx.Client) -> None:
    assert client.post(V1, content=v1_body([one_json]), headers=JSON_TYPE).status_code == 200
    assert client.get(V1).status_code == 405
