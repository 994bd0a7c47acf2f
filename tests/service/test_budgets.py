"""Robustness answers end to end: a real calibration with a budget grid is published, a real
server answers each prediction with p_robust, the margin interval and the runner-up, at the
budget a request picks (v1 JSON and form, KServe v1 instances, OIP v2), and refuses a budget off
the grid with 422. Every answer is checked against the record's own curves."""

from __future__ import annotations

import concurrent.futures
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from PIL import Image
from ports import free_port
from tritonclient.grpc import service_pb2, service_pb2_grpc

from marginwatch.artifact.schema import CalibrationRecord
from marginwatch.artifact.store import current_dir, read_record
from marginwatch.calibration.__main__ import main
from tests.service.conftest import Server, ServerFactory

MODEL = "fmnist-cnn-pgd"
GRID = [0.05, 0.1, 0.2]
TINY = ["--subset-size", "60", "--attack", "fmn:10", "--attack", "fab-top3:5", "--bootstrap",
        "20", "--pseudo-margin", "never", "--quiet", "--seed", "3"]  # fmt: skip


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    args = ["--model", MODEL, "--dataset", "fashion-mnist-subset", "--store", str(root)]
    assert main([*args, *TINY, "--eps-grid", "0.05,0.2"]) == 0
    return root


@pytest.fixture(scope="module")
def record(store: Path) -> CalibrationRecord:
    return read_record(current_dir(store, MODEL))


GRPC_PORT = free_port()


@pytest.fixture(scope="module")
def server(
    store: Path, spawn_server: ServerFactory, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    logs = tmp_path_factory.mktemp("logs")
    with spawn_server(store, logs, max_batch_wait_s="0.02", grpc_port=str(GRPC_PORT)) as running:
        yield running


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        yield http


def budget(record: CalibrationRecord, eps: float) -> int:
    assert record.budgets is not None
    return [b.eps for b in record.budgets].index(eps)


def check_items(items: list[dict], record: CalibrationRecord, eps: float) -> None:
    """Each item's answers are the record's curves at its score, at budget `eps`."""
    assert record.budgets is not None and record.margin_quantiles is not None
    chosen = record.budgets[budget(record, eps)]
    scores = np.array([item["score"] for item in items], dtype=np.float32)
    assert [item["eps"] for item in items] == [eps] * len(items)
    assert [item["threshold"] for item in items] == [chosen.threshold] * len(items)
    assert [item["brittle"] for item in items] == (scores < chosen.threshold).tolist()
    p = np.array([item["p_robust"] for item in items])
    np.testing.assert_allclose(p, chosen.p_robust(scores), rtol=1e-6, atol=1e-7)
    low, middle, high = record.margin_quantiles(scores)
    np.testing.assert_allclose([item["margin_estimate"] for item in items], middle, rtol=1e-6)
    np.testing.assert_allclose(
        [item["margin_interval"] for item in items], np.c_[low, high], rtol=1e-6
    )
    for item in items:
        assert item["runner_up"] != item["label"]
        assert item["runner_up_class_name"] == record.class_names[item["runner_up"]]


def v1(client: httpx.Client, images: np.ndarray, **extra: object) -> httpx.Response:
    return client.post(f"/v1/models/{MODEL}/predict", json={"inputs": images.tolist(), **extra})


def test_the_calibration_publishes_the_grid_with_the_served_eps(record: CalibrationRecord) -> None:
    assert record.budgets is not None and [b.eps for b in record.budgets] == GRID
    served = record.budgets[budget(record, 0.1)]
    assert served.threshold == record.threshold
    assert served.robust_accuracy == record.robust_accuracy
    thresholds = [b.threshold for b in record.budgets]
    assert thresholds == sorted(thresholds)
    estimates = [b.robust_accuracy.estimate for b in record.budgets]
    assert estimates == sorted(estimates, reverse=True)
    assert record.margin_quantiles is not None and record.margin_quantiles.levels == [0.1, 0.5, 0.9]
    assert record.predicted_class_counts is not None and sum(record.predicted_class_counts) == 2000


def test_v1_answers_at_the_served_budget_by_default(
    client: httpx.Client, images: np.ndarray, record: CalibrationRecord
) -> None:
    response = v1(client, images[:16])
    assert response.status_code == 200, response.text
    check_items(response.json()["predictions"], record, 0.1)


@pytest.mark.parametrize("eps", GRID)
def test_v1_answers_at_a_chosen_budget(
    client: httpx.Client, images: np.ndarray, record: CalibrationRecord, eps: float
) -> None:
    response = v1(client, images[:16], eps=eps)
    assert response.status_code == 200, response.text
    check_items(response.json()["predictions"], record, eps)


def test_kserve_v1_instances_take_eps(
    client: httpx.Client, images: np.ndarray, record: CalibrationRecord
) -> None:
    body = {"instances": images[:4].tolist(), "eps": 0.05}
    response = client.post(f"/v1/models/{MODEL}/predict", json=body)
    assert response.status_code == 200, response.text
    check_items(response.json()["predictions"], record, 0.05)


@pytest.mark.parametrize(
    ("eps", "status", "says"),
    [(0.3, 422, "[0.05, 0.1, 0.2]"), (0.15, 422, "budget grid"), ("0.1", 400, "must be a number"),
     (-0.1, 400, "positive"), (True, 400, "must be a number"), (0, 400, "positive")],
)  # fmt: skip
def test_v1_refuses_a_budget_off_the_grid(
    client: httpx.Client, images: np.ndarray, eps: object, status: int, says: str
) -> None:
    response = v1(client, images[:1], eps=eps)
    assert response.status_code == status, response.text
    assert says in response.json()["error"]


def test_a_form_of_image_files_takes_eps(
    client: httpx.Client, images: np.ndarray, record: CalibrationRecord
) -> None:
    png = io.BytesIO()
    Image.fromarray((images[0, 0] * 255).round().astype(np.uint8)).save(png, format="PNG")
    files = [("file", ("x.png", png.getvalue(), "image/png"))]
    response = client.post(f"/v1/models/{MODEL}/predict", files=files, data={"eps": "0.2"})
    assert response.status_code == 200, response.text
    check_items(response.json()["predictions"], record, 0.2)
    refused = client.post(f"/v1/models/{MODEL}/predict", files=files, data={"eps": "wide"})
    assert refused.status_code == 400 and "number" in refused.json()["error"]


def v2_body(images: np.ndarray, **parameters: object) -> dict[str, object]:
    return {
        "inputs": [
            {"name": "input", "shape": list(images.shape), "datatype": "FP32",
             "data": images.ravel().tolist()}
        ],
        "parameters": parameters,
    }  # fmt: skip


def test_v2_answers_at_parameters_eps(
    client: httpx.Client, images: np.ndarray, record: CalibrationRecord
) -> None:
    response = client.post(f"/v2/models/{MODEL}/infer", json=v2_body(images[:8], eps=0.05))
    assert response.status_code == 200, response.text
    body = response.json()
    assert record.budgets is not None
    chosen = record.budgets[budget(record, 0.05)]
    assert body["parameters"]["eps"] == 0.05
    assert body["parameters"]["threshold"] == chosen.threshold
    assert body["parameters"]["robust_accuracy"] == chosen.robust_accuracy.estimate
    outputs = {output["name"]: output["data"] for output in body["outputs"]}
    scores = np.array(outputs["score"], dtype=np.float32)
    assert outputs["brittle"] == (scores < chosen.threshold).tolist()
    np.testing.assert_allclose(outputs["p_robust"], chosen.p_robust(scores), rtol=1e-6, atol=1e-7)
    assert record.margin_quantiles is not None
    low, middle, high = record.margin_quantiles(scores)
    np.testing.assert_allclose(outputs["margin_low"], low, rtol=1e-6)
    np.testing.assert_allclose(outputs["margin_estimate"], middle, rtol=1e-6)
    np.testing.assert_allclose(outputs["margin_high"], high, rtol=1e-6)
    assert all(
        up != label for up, label in zip(outputs["runner_up"], outputs["label"], strict=True)
    )
    off = client.post(f"/v2/models/{MODEL}/infer", json=v2_body(images[:1], eps=1.0))
    assert off.status_code == 422 and "[0.05, 0.1, 0.2]" in off.json()["error"]


def test_model_metadata_lists_the_grid_and_the_outputs(
    client: httpx.Client, record: CalibrationRecord
) -> None:
    meta = client.get(f"/v2/models/{MODEL}").json()
    assert meta["parameters"]["eps_grid"] == GRID
    assert record.budgets is not None
    assert meta["parameters"]["budgets"] == [
        {"eps": b.eps, "threshold": b.threshold, "robust_accuracy": b.robust_accuracy.estimate}
        for b in record.budgets
    ]
    assert meta["parameters"]["margin_interval"] == 0.8
    names = [output["name"] for output in meta["outputs"]]
    for name in ("p_robust", "margin_estimate", "margin_low", "margin_high", "runner_up"):
        assert name in names


def test_requests_at_different_budgets_in_one_batch_keep_their_own(
    client: httpx.Client, images: np.ndarray, record: CalibrationRecord
) -> None:
    """Requests sharing a batch are answered each at its own budget."""
    asked = [GRID[i % 3] for i in range(24)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(
            pool.map(lambda i: v1(client, images[i : i + 2], eps=asked[i]), range(len(asked)))
        )
    for eps, response in zip(asked, responses, strict=True):
        assert response.status_code == 200, response.text
        check_items(response.json()["predictions"], record, eps)


def grpc_infer(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, batch: np.ndarray, **eps: float
) -> Any:
    """`ModelInfer` with raw FP32 input and, as KServe's and Triton's clients send a float,
    `parameters.eps` as a double (tritonclient's `infer` takes no float parameter)."""
    request = service_pb2.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="input", datatype="FP32", shape=batch.shape)
    request.raw_input_contents.append(batch.astype(np.float32).tobytes())
    for key, value in eps.items():
        request.parameters[key].double_param = value
    return stub.ModelInfer(request)


def outputs_of(response: Any) -> dict[str, np.ndarray]:
    dtypes = {"FP32": np.float32, "INT64": np.int64, "BOOL": np.bool_}
    return {
        output.name: np.frombuffer(raw, dtype=dtypes[output.datatype])
        for output, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }


def test_grpc_answers_at_parameters_eps(
    server: Server, images: np.ndarray, record: CalibrationRecord
) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{GRPC_PORT}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        response = grpc_infer(stub, images[:4], eps=0.2)
        served = grpc_infer(stub, images[:4])
        with pytest.raises(grpc.RpcError) as refused:
            grpc_infer(stub, images[:4], eps=0.3)
    assert record.budgets is not None
    chosen = record.budgets[budget(record, 0.2)]
    assert response.parameters["eps"].double_param == 0.2
    assert response.parameters["threshold"].double_param == chosen.threshold
    outputs = outputs_of(response)
    scores = outputs["score"]
    assert outputs["brittle"].tolist() == (scores < chosen.threshold).tolist()
    np.testing.assert_allclose(outputs["p_robust"], chosen.p_robust(scores), rtol=1e-6, atol=1e-7)
    assert served.parameters["eps"].double_param == 0.1
    assert served.parameters["threshold"].double_param == record.threshold
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "[0.05, 0.1, 0.2]" in refused.value.details()
