"""/metrics parsed with prometheus_client's own parser."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import numpy as np
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from marginwatch.artifact.schema import CalibrationRecord

MODEL = "fmnist"
API_KEY = "test-key-0123456789"


@pytest.fixture
def client(server: object) -> Iterator[httpx.Client]:
    url = server.url  # type: ignore[attr-defined]
    with httpx.Client(base_url=url, headers={"X-API-Key": API_KEY}, timeout=20) as http:
        yield http


def scrape(client: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_follow_served_traffic(
    client: httpx.Client, images: np.ndarray, record: CalibrationRecord
) -> None:
    before = scrape(client)
    body = orjson.dumps({"inputs": images[:20].tolist()})
    response = client.post(
        f"/v1/models/{MODEL}/predict", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 200
    brittle = sum(item["brittle"] for item in response.json()["predictions"])
    client.post("/v1/models/nope/predict", content=body)  # 404: labelled _unknown, not "nope"
    after = scrape(client)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("marginwatch_predictions_total", model=MODEL, brittle="true") == brittle
    assert delta("marginwatch_predictions_total", model=MODEL, brittle="false") == 20 - brittle
    ok = {"model": MODEL, "endpoint": "v1_predict"}
    assert delta("marginwatch_requests_total", status_class="2xx", **ok) == 1
    assert delta("marginwatch_request_duration_seconds_count", **ok) == 1
    assert delta("marginwatch_requests_total", model="_unknown", endpoint="v1_predict",
                 status_class="4xx") == 1  # fmt: skip
    assert not any("nope" in str(labels) for _, labels in after)
    assert delta("marginwatch_score_count", model=MODEL) == 20
    assert delta("marginwatch_batch_size_sum", model=MODEL) == 20
    assert delta("marginwatch_model_execution_seconds_count", model=MODEL) >= 1
    assert value(after, "marginwatch_calibration_robust_accuracy_ratio", model=MODEL) == (
        record.robust_accuracy.estimate
    )
    live = value(after, "marginwatch_live_robust_accuracy_ratio", model=MODEL)
    assert min(record.live_curve.knots_y) <= live <= max(record.live_curve.knots_y)
    assert value(after, "marginwatch_live_window_predictions", model=MODEL) >= 20
    assert value(after, "marginwatch_calibration_timestamp_seconds", model=MODEL) == 1764072000.0
    info = [labels for name, labels in after if name == "marginwatch_calibration_info"]
    assert dict(info[0])["version"] == "v1"
    assert value(after, "marginwatch_reloads_total", model=MODEL, result="success") == 1
