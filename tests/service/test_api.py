"""Both APIs end to end against a real uvicorn server: results equal ONNX Runtime's own."""

from __future__ import annotations

import concurrent.futures

import httpx
import numpy as np
import orjson

from marginwatch.artifact.schema import CalibrationRecord

MODEL = "fmnist"

HEADER = "Inference-Header-Content-Length"


def v1_predict(client: httpx.Client, batch: np.ndarray, **extra: object) -> httpx.Response:
    body = orjson.dumps({"inputs": batch.tolist(), **extra})
    return client.post(
        f"/v1/models/{MODEL}/predict", content=body, headers={"Content-Type": "application/json"}
    )


def v2_json(batch: np.ndarray, **extra: object) -> dict[str, object]:
    return {
        "id": "req-1",
        "inputs": [
            {
                "name": "input",
                "shape": list(batch.shape),
                "datatype": "FP32",
                "data": batch.ravel().tolist(),
            }
        ],
        **extra,
    }


def test_v1_predict_matches_onnx_runtime(
    client: httpx.Client,
    images: np.ndarray,
    reference: tuple[np.ndarray, np.ndarray],
    record: CalibrationRecord,
) -> None:
    logits, scores = reference
    response = v1_predict(client, images[:32], return_probabilities=True)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_name"] == MODEL
    assert body["calibration_version"] == "v1"
    items = body["predictions"]
    assert [item["label"] for item in items] == logits[:32].argmax(1).tolist()
    assert [item["class_name"] for item in items] == [
        record.class_names[label] for label in logits[:32].argmax(1)
    ]
    served = np.array([item["score"] for item in items])
    np.testing.assert_allclose(served, scores[:32], atol=record.guard_band)
    assert [item["brittle"] for item in items] == (served < record.threshold).tolist()
    assert any(item["brittle"] for item in items) and not all(item["brittle"] for item in items)
    borderline = np.abs(served - record.threshold) <= record.guard_band
    assert [item["borderline"] for item in items] == borderline.tolist()
    assert all(item["threshold"] == record.threshold for item in items)
    probabilities = np.array([item["probabilities"] for item in items])
    np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-5)
    assert (probabilities.argmax(1) == logits[:32].argmax(1)).all()


def test_v1_probabilities_only_on_request(client: httpx.Client, images: np.ndarray) -> None:
    response = v1_predict(client, images[:2])
    assert response.status_code == 200
    assert all("probabilities" not in item for item in response.json()["predictions"])


def test_v2_infer_json_matches_onnx_runtime(
    client: httpx.Client,
    images: np.ndarray,
    reference: tuple[np.ndarray, np.ndarray],
    record: CalibrationRecord,
) -> None:
    logits, scores = reference
    response = client.post(f"/v2/models/{MODEL}/infer", json=v2_json(images[:8]))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_name"] == MODEL and body["model_version"] == "v1" and body["id"] == "req-1"
    assert body["parameters"]["threshold"] == record.threshold
    assert body["parameters"]["calibration_version"] == "v1"
    assert body["parameters"]["guard_band"] == record.guard_band
    outputs = {output["name"]: output for output in body["outputs"]}
    assert {name: (o["datatype"], o["shape"]) for name, o in outputs.items()} == {
        "logits": ("FP32", [8, 10]),
        "label": ("INT64", [8]),
        "score": ("FP32", [8]),
        "brittle": ("BOOL", [8]),
        "borderline": ("BOOL", [8]),
        "p_robust": ("FP32", [8]),
        "margin_estimate": ("FP32", [8]),
        "margin_low": ("FP32", [8]),
        "margin_high": ("FP32", [8]),
        "runner_up": ("INT64", [8]),
    }
    assert outputs["label"]["data"] == logits[:8].argmax(1).tolist()
    np.testing.assert_allclose(outputs["logits"]["data"], logits[:8].ravel(), atol=1e-5)
    np.testing.assert_allclose(outputs["score"]["data"], scores[:8], atol=record.guard_band)
    assert (
        outputs["brittle"]["data"]
        == (np.array(outputs["score"]["data"]) < record.threshold).tolist()
    )


def test_v2_infer_nested_data_and_chosen_outputs(client: httpx.Client, images: np.ndarray) -> None:
    body = v2_json(images[:3], outputs=[{"name": "label"}, {"name": "brittle"}])
    body["inputs"][0]["data"] = images[:3].tolist()  # type: ignore[index]
    response = client.post(f"/v2/models/{MODEL}/infer", json=body)
    assert response.status_code == 200, response.text
    assert [output["name"] for output in response.json()["outputs"]] == ["label", "brittle"]


def test_v2_binary_tensors_both_ways(
    client: httpx.Client, images: np.ndarray, reference: tuple[np.ndarray, np.ndarray]
) -> None:
    logits, scores = reference
    batch = images[:5]
    raw = batch.astype("<f4").tobytes()
    header = {
        "inputs": [
            {
                "name": "input",
                "shape": list(batch.shape),
                "datatype": "FP32",
                "parameters": {"binary_data_size": len(raw)},
            }
        ],
        "outputs": [
            {"name": "logits", "parameters": {"binary_data": True}},
            {"name": "label", "parameters": {"binary_data": True}},
            {"name": "score", "parameters": {"binary_data": True}},
            {"name": "brittle", "parameters": {"binary_data": False}},
        ],
    }
    encoded = orjson.dumps(header)
    response = client.post(
        f"/v2/models/{MODEL}/infer",
        content=encoded + raw,
        headers={HEADER: str(len(encoded)), "Content-Type": "application/octet-stream"},
    )
    assert response.status_code == 200, response.text
    length = int(response.headers[HEADER])
    meta = orjson.loads(response.content[:length])
    blob = response.content[length:]
    arrays = {}
    offset = 0
    for output in meta["outputs"]:
        if "data" in output:
            arrays[output["name"]] = np.array(output["data"])
            continue
        size = output["parameters"]["binary_data_size"]
        dtype = {"FP32": "<f4", "INT64": "<i8", "BOOL": "?"}[output["datatype"]]
        arrays[output["name"]] = np.frombuffer(blob[offset : offset + size], dtype=dtype).reshape(
            output["shape"]
        )
        offset += size
    assert offset == len(blob)
    np.testing.assert_allclose(arrays["logits"], logits[:5], atol=1e-5)
    assert arrays["label"].tolist() == logits[:5].argmax(1).tolist()
    np.testing.assert_allclose(arrays["score"], scores[:5], atol=1e-4)
    assert arrays["brittle"].dtype == bool


def test_v2_binary_output_for_a_json_request(client: httpx.Client, images: np.ndarray) -> None:
    body = v2_json(images[:2], parameters={"binary_data_output": True})
    response = client.post(f"/v2/models/{MODEL}/infer", json=body)
    assert response.status_code == 200
    length = int(response.headers[HEADER])
    meta = orjson.loads(response.content[:length])
    sizes = [output["parameters"]["binary_data_size"] for output in meta["outputs"]]
    # logits, label, score, brittle, borderline, p_robust, the margin's three, runner_up
    assert sizes == [2 * 10 * 4, 2 * 8, 2 * 4, 2, 2, 2 * 4, 2 * 4, 2 * 4, 2 * 4, 2 * 8]
    assert len(response.content) == length + sum(sizes)


def test_v2_metadata_and_health(client: httpx.Client, record: CalibrationRecord) -> None:
    server = client.get("/v2").json()
    assert server["name"] == "marginwatch" and "binary_tensor_data" in server["extensions"]
    assert client.get("/v2/health/live").json() == {"live": True}
    meta = client.get(f"/v2/models/{MODEL}").json()
    assert meta["versions"] == ["v1"] and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    assert [o["name"] for o in meta["outputs"]] == [
        "logits",
        "label",
        "score",
        "brittle",
        "borderline",
        "p_robust",
        "margin_estimate",
        "margin_low",
        "margin_high",
        "runner_up",
    ]
    assert meta["parameters"]["threshold"] == record.threshold
    assert client.get(f"/v2/models/{MODEL}/ready").json() == {"ready": True}
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert "requestBody" in paths["/v1/models/{name}/predict"]["post"]


def test_batch_invariance(
    client: httpx.Client, images: np.ndarray, record: CalibrationRecord
) -> None:
    """The same sample alone, among 63 others in one request, and among concurrent requests."""
    sample = images[7:8]
    alone = v1_predict(client, sample).json()["predictions"][0]
    crowd = np.concatenate([images[100:131], sample, images[131:163]])
    among = v1_predict(client, crowd).json()["predictions"][31]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        singles = list(pool.map(lambda i: v1_predict(client, crowd[i : i + 1]), range(64)))
    concurrent_one = singles[31].json()["predictions"][0]
    for other in (among, concurrent_one):
        assert other["label"] == alone["label"]
        assert other["brittle"] == alone["brittle"]
        assert abs(other["score"] - alone["score"]) <= record.guard_band
    assert all(response.status_code == 200 for response in singles)
