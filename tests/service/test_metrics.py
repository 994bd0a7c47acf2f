"""The metrics: `ServedTraffic` folding records into Prometheus families, and /metrics of a
running server parsed with prometheus_client's own parser."""

from __future__ import annotations

import weakref

import httpx
import numpy as np
import orjson
import pytest

from marginwatch.artifact.schema import CalibrationRecord, Curve
from marginwatch.artifact.store import current_dir, default_store, read_record
from marginwatch.service.batcher import RunBatch
from marginwatch.service.served_traffic import ServedTraffic
from metrics_text import Samples, parse, value

MODEL = "fmnist"


def scrape(client: httpx.Client) -> Samples:
    """/metrics of the in-process app."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


def got(samples: Samples, name: str, **labels: str) -> float:
    """`value`, with a series not (yet) exported read as 0."""
    return value(samples, name, **labels) or 0.0


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
        return got(after, name, **labels) - got(before, name, **labels)

    predicted = [labels for name, labels in after if name == "marginwatch_predictions_total"]
    assert {dict(labels)["class"] for labels in predicted} == set(record.class_names)
    assert sum(delta("marginwatch_predictions_total", model=MODEL, brittle="true", **{"class": c})
               for c in record.class_names) == brittle  # fmt: skip
    assert sum(delta("marginwatch_predictions_total", model=MODEL, brittle="false", **{"class": c})
               for c in record.class_names) == 20 - brittle  # fmt: skip
    ok = {"model": MODEL, "endpoint": "v1_predict"}
    assert delta("marginwatch_requests_total", status_class="2xx", **ok) == 1
    assert delta("marginwatch_request_duration_seconds_count", **ok) == 1
    assert delta("marginwatch_requests_total", model="_unknown", endpoint="v1_predict",
                 status_class="4xx") == 1  # fmt: skip
    assert not any("nope" in str(labels) for _, labels in after)
    assert delta("marginwatch_score_count", model=MODEL) == 20
    assert delta("marginwatch_batch_size_sum", model=MODEL) == 20
    assert delta("marginwatch_model_execution_seconds_count", model=MODEL) >= 1
    served = {"model": MODEL, "eps": "0.1", "served": "true"}  # a record without a grid: ε alone
    assert got(after, "marginwatch_calibration_robust_accuracy_ratio", **served) == (
        record.robust_accuracy.estimate
    )
    live = got(after, "marginwatch_live_robust_accuracy_ratio", **served)
    assert min(record.live_curve.knots_y) <= live <= max(record.live_curve.knots_y)
    assert got(after, "marginwatch_live_window_predictions", model=MODEL) >= 20
    assert got(after, "marginwatch_calibration_timestamp_seconds", model=MODEL) == 1764072000.0
    info = [labels for name, labels in after if name == "marginwatch_calibration_info"]
    assert dict(info[0])["version"] == "v1"
    assert got(after, "marginwatch_reloads_total", model=MODEL, result="success") == 1


def test_served_traffic_folds_batches_into_prometheus_families(toy_model: RunBatch) -> None:
    traffic = ServedTraffic(window_predictions=4)
    # as a record from before the grid: ε alone
    shipped = read_record(current_dir(default_store(), "fmnist-cnn-pgd")).model_copy(
        update={"budgets": None, "margin_quantiles": None}
    )
    low = shipped.model_copy(update={"live_curve": Curve(knots_x=[0.0, 1.0], knots_y=[0.0, 1.0])})
    high = shipped.model_copy(update={"live_curve": Curve(knots_x=[0.0], knots_y=[1.0])})
    traffic.record("m", low, toy_model(np.array([[0.0], [0.5], [1.0]], dtype=np.float32)), 0.0005)
    traffic.record("m", high, toy_model(np.array([[0.2]], dtype=np.float32)), 0.003)
    traffic.record_request("m", "v1_predict", 200, 0.001)
    traffic.record_request("m", "v1_predict", 404, 0.0001)
    traffic.watch_queue("m", lambda: 7)
    samples: Samples = {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in traffic.collect()
        for sample in family.samples
    }

    def series(name: str, **labels: str) -> float | None:
        return value(samples, name, model="m", **labels)

    assert series("marginwatch_batch_size_count") == 2
    assert series("marginwatch_batch_size_sum") == 4
    assert series("marginwatch_batch_size_bucket", le="1.0") == 1
    assert series("marginwatch_batch_size_bucket", le="4.0") == 2
    # `le` buckets: 0.5 counts in le="0.5", as prometheus_client's own histograms count it
    assert series("marginwatch_score_bucket", le="0.5") == 3  # 0.0, 0.2, 0.5
    assert series("marginwatch_score_count") == 4
    assert series("marginwatch_score_sum") == pytest.approx(1.7)
    assert series("marginwatch_model_execution_seconds_bucket", le="0.0005") == 1
    # the toy predicts class 0 throughout; brittle are the scores 0.0 and 0.2
    first = {"class": shipped.class_names[0]}
    assert series("marginwatch_predictions_total", brittle="true", **first) == 2
    assert series("marginwatch_predictions_total", brittle="false", **first) == 2
    assert series("marginwatch_predictions_total", brittle="true", **{"class": "Bag"}) == 0
    # g of each batch comes from its own version's curve: 0, 0.5, 1 and then 1
    live = series("marginwatch_live_robust_accuracy_ratio", eps="0.1", served="true")
    assert live == pytest.approx(2.5 / 4)
    assert series("marginwatch_live_window_predictions") == 4
    assert series("marginwatch_queued_samples") == 7
    assert series("marginwatch_requests_total", endpoint="v1_predict", status_class="2xx") == 1
    assert series("marginwatch_requests_total", endpoint="v1_predict", status_class="4xx") == 1
    assert series("marginwatch_request_duration_seconds_count", endpoint="v1_predict") == 2


def test_served_traffic_folds_on_its_own_when_nobody_scrapes(toy_model: RunBatch) -> None:
    traffic = ServedTraffic(window_predictions=10)
    record = read_record(current_dir(default_store(), "fmnist-cnn-pgd"))
    for _ in range(ServedTraffic.FOLD_EVERY + 5):
        traffic.record("m", record, toy_model(np.zeros((1, 1), dtype=np.float32)), 0.001)
        traffic.record_request("m", "v1_predict", 200, 0.001)
    assert traffic.pending() < ServedTraffic.FOLD_EVERY  # memory stays bounded


def test_served_traffic_keeps_no_batch_alive_and_counts_any_batch_size(
    toy_model: RunBatch,
) -> None:
    """The inbox copies what it needs: a served batch's arrays are freed once it is answered
    (holding 1,024 of them made the concurrency-1 p99 2-3× the minimal endpoint's), and a batch
    larger than the whole inbox is counted as any other."""
    traffic = ServedTraffic(window_predictions=10_000)
    record = read_record(current_dir(default_store(), "fmnist-cnn-pgd"))
    prediction = toy_model(np.array([[0.2], [0.7]], dtype=np.float32))
    held = weakref.ref(prediction.scores)
    traffic.record("m", record, prediction, 0.001)
    del prediction
    assert held() is None
    assert traffic.pending() == 2
    big = ServedTraffic.FOLD_EVERY + 3
    scores = np.linspace(0.0, 1.0, big, dtype=np.float32).reshape(big, 1)
    traffic.record("m", record, toy_model(scores), 0.002)
    samples: Samples = {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in traffic.collect()
        for sample in family.samples
    }
    assert value(samples, "marginwatch_batch_size_count", model="m") == 2
    assert value(samples, "marginwatch_score_count", model="m") == big + 2
    assert value(samples, "marginwatch_live_window_predictions", model="m") == big + 2
    brittle = int((scores < 0.5).sum()) + 1  # and 0.2 of the first batch
    first = {"class": record.class_names[0]}
    assert value(samples, "marginwatch_predictions_total", model="m", brittle="true",
                 **first) == brittle  # fmt: skip
    assert traffic.pending() == 0
