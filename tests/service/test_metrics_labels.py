"""The metrics' `eps`, `served` and `class` labels, read from the service's real exposition text:
one robust-accuracy series per budget of the served version's grid (the served one marked), one
for a record without a grid, the grid's series following a reload, and predictions counted by
predicted class under a cap, with `other` for the rest; the cap's setting end to end in a real
server."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import numpy as np
import orjson
import pytest

from marginwatch.artifact.schema import RECORD_FILE, CalibrationRecord
from marginwatch.artifact.store import current_dir, default_store, read_record
from marginwatch.service.engine import Prediction
from marginwatch.service.metrics import ServiceMetrics
from metrics_text import Samples, parse

if TYPE_CHECKING:
    from conftest import ServerFactory, VersionFactory

CALIBRATION = "marginwatch_calibration_robust_accuracy_ratio"
LIVE = "marginwatch_live_robust_accuracy_ratio"
PREDICTIONS = "marginwatch_predictions_total"


@pytest.fixture(scope="module")
def shipped() -> CalibrationRecord:
    """The shipped record as one written before the grid: it serves its ε alone (0.1)."""
    record = read_record(current_dir(default_store(), "fmnist-cnn-pgd"))
    assert record.threat_model.eps == 0.1
    return record.model_copy(update={"budgets": None, "margin_quantiles": None})


def with_grid(
    record: CalibrationRecord,
    grid: list[float],
    live: list[float],
    accuracy: list[float],
    eps: float | None = None,
    **update: object,
) -> CalibrationRecord:
    """`record` serving `eps` (default: its own) with a budget grid whose live curves are the
    constants `live` (so the live gauges are known exactly) and estimates `accuracy`; λ grows
    with the budget, the served one's is the record's. Validated: a record the service loads."""
    threat_model = {"norm": record.threat_model.norm, "eps": eps or record.threat_model.eps}
    served = grid.index(threat_model["eps"])
    budgets = [
        {
            "eps": eps,
            "threshold": record.threshold + 0.01 * (index - served),
            "robust_accuracy": {"method": "regression", "estimate": estimate,
                                "ci_low": None, "ci_high": None},
            "subset_nonrobust": 0.3,
            "p_robust": {"knots_x": [0.0], "knots_y": [0.5]},
            "live_curve": {"knots_x": [0.0], "knots_y": [g]},
        }
        for index, (eps, g, estimate) in enumerate(zip(grid, live, accuracy, strict=True))
    ]  # fmt: skip
    data = {**record.model_dump(mode="json"), "threat_model": threat_model, "budgets": budgets}
    data.update(update)
    return CalibrationRecord.model_validate(data)


def batch(record: CalibrationRecord, labels: list[int], brittle: list[bool]) -> Prediction:
    """A batch predicting `labels` with these flags (the scores do not matter: g is constant)."""
    scores = np.zeros(len(labels), dtype=np.float32)
    logits = np.zeros((len(labels), len(record.class_names)), dtype=np.float32)
    return Prediction.without_answers(
        logits, scores, np.array(labels), np.array(brittle), np.zeros(len(labels), dtype=bool)
    )


def exported(samples: Samples, name: str, *keys: str, model: str = "m") -> dict[tuple, float]:
    """`model`'s samples of `name`, by the values of the labels `keys` (every other label but
    `model` must be absent, so a stray label fails)."""
    found: dict[tuple, float] = {}
    for (sample, labels), value in samples.items():
        have = dict(labels)
        if sample == name and have.pop("model", None) == model:
            assert set(have) == set(keys), have
            found[tuple(have[key] for key in keys)] = value
    return found


def scrape(metrics: ServiceMetrics) -> Samples:
    return parse(metrics.exposition().decode())


def test_every_budget_of_the_grid_has_its_series(shipped: CalibrationRecord) -> None:
    record = with_grid(
        shipped, [0.025, 0.05, 0.1, 0.2], [0.9, 0.8, 0.7, 0.5], [0.85, 0.8, 0.7, 0.4]
    )
    metrics = ServiceMetrics(100)
    metrics.observe_version("m", record)
    metrics.observe_batch("m", record, batch(record, [0, 1, 1], [True, False, True]), 0.001)
    samples = scrape(metrics)
    assert exported(samples, CALIBRATION, "eps", "served") == {
        ("0.025", "false"): 0.85, ("0.05", "false"): 0.8, ("0.1", "true"): 0.7,
        ("0.2", "false"): 0.4,
    }  # fmt: skip
    assert exported(samples, LIVE, "eps", "served") == pytest.approx(
        {("0.025", "false"): 0.9, ("0.05", "false"): 0.8, ("0.1", "true"): 0.7,
         ("0.2", "false"): 0.5}
    )  # fmt: skip
    # the window size keeps its one label: the served budget's window
    assert exported(samples, "marginwatch_live_window_predictions") == {(): 3}


def test_a_record_without_a_grid_has_one_series_at_its_eps(shipped: CalibrationRecord) -> None:
    metrics = ServiceMetrics(100)
    metrics.observe_version("m", shipped)
    metrics.observe_batch("m", shipped, batch(shipped, [2, 2], [False, False]), 0.001)
    samples = scrape(metrics)
    estimate = shipped.robust_accuracy.estimate
    assert exported(samples, CALIBRATION, "eps", "served") == {("0.1", "true"): estimate}
    g = float(shipped.live_curve(np.zeros(1))[0])
    assert exported(samples, LIVE, "eps", "served") == {("0.1", "true"): pytest.approx(g)}


def test_a_reload_to_another_grid_keeps_only_its_budgets(shipped: CalibrationRecord) -> None:
    """Budgets of the new grid keep or start their windows; the others' series are gone. A
    batch the old version finishes after the reload still counts where the grids share a
    budget. Forgetting the model drops every series."""
    old = with_grid(shipped, [0.025, 0.05, 0.1, 0.2], [0.9, 0.8, 0.7, 0.5], [0.85, 0.8, 0.7, 0.4])
    new = with_grid(shipped, [0.05, 0.1, 0.4], [0.6, 0.3, 0.1], [0.75, 0.6, 0.2], eps=0.05)
    metrics = ServiceMetrics(100)
    metrics.observe_version("m", old)
    metrics.observe_batch("m", old, batch(old, [0] * 4, [False] * 4), 0.001)
    metrics.observe_version("m", new)
    metrics.observe_batch("m", old, batch(old, [0] * 2, [False] * 2), 0.001)  # the old drains
    metrics.observe_batch("m", new, batch(new, [0] * 2, [False] * 2), 0.001)
    samples = scrape(metrics)
    assert exported(samples, CALIBRATION, "eps", "served") == {
        ("0.05", "true"): 0.75, ("0.1", "false"): 0.6, ("0.4", "false"): 0.2
    }  # fmt: skip
    assert exported(samples, LIVE, "eps", "served") == pytest.approx(
        {
            ("0.05", "true"): (6 * 0.8 + 2 * 0.6) / 8,
            ("0.1", "false"): (6 * 0.7 + 2 * 0.3) / 8,
            ("0.4", "false"): 0.1,  # a new budget: only the new version's batch
        }
    )
    assert exported(samples, "marginwatch_live_window_predictions") == {(): 8}
    metrics.forget("m")
    samples = scrape(metrics)
    assert not exported(samples, CALIBRATION, "eps", "served")
    assert not exported(samples, LIVE, "eps", "served")


# FashionMNIST's classes, the shipped record's
NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
         "Bag", "Ankle boot"]  # fmt: skip


@pytest.mark.parametrize(
    ("cap", "names", "counts", "expected"),
    [
        (10, NAMES, None, NAMES),
        (3, NAMES, [5, 50, 1, 40, 0, 0, 30, 0, 0, 0], ["Trouser", "Dress", "Shirt", "other"]),
        (3, NAMES, None, ["T-shirt/top", "Trouser", "Pullover", "other"]),  # older records
        (2, NAMES, [1] * 10, ["T-shirt/top", "Trouser", "other"]),  # ties: by label
        (2, [*NAMES[:9], "other"], [0] * 9 + [99], ["T-shirt/top", "other", "_other"]),
    ],
    ids=["all", "most-predicted", "no-counts", "ties", "class-named-other"],
)
def test_class_labels_are_capped(
    shipped: CalibrationRecord,
    cap: int,
    names: list[str],
    counts: list[int] | None,
    expected: list[str],
) -> None:
    record = shipped.model_copy(update={"class_names": names, "predicted_class_counts": counts})
    metrics = ServiceMetrics(100, class_labels=cap)
    metrics.observe_version("m", record)  # every value's counters exist at 0 from the load
    samples = scrape(metrics)
    values = exported(samples, PREDICTIONS, "brittle", "class")
    assert values == {(brittle, name): 0 for name in expected for brittle in ("true", "false")}


def test_predictions_are_counted_by_class_and_never_move(shipped: CalibrationRecord) -> None:
    """Each prediction counts under its class's value, or `other`; a reload to a version that
    favours other classes starts their counters and keeps the old ones as they were."""
    counts = [5, 50, 1, 40, 0, 0, 30, 0, 0, 0]
    first = shipped.model_copy(update={"predicted_class_counts": counts})
    metrics = ServiceMetrics(100, class_labels=2)  # Trouser and Dress; the rest is other
    metrics.observe_version("m", first)
    labels = [1, 1, 3, 6, 0, 3, 9]
    brittle = [True, False, True, True, False, False, False]
    metrics.observe_batch("m", first, batch(first, labels, brittle), 0.001)
    second = shipped.model_copy(update={"predicted_class_counts": counts[::-1]})  # Shirt, Bag
    metrics.observe_version("m", second)
    metrics.observe_batch("m", second, batch(second, [8, 1], [True, True]), 0.001)
    samples = scrape(metrics)
    assert exported(samples, PREDICTIONS, "class", "brittle") == {
        ("Trouser", "true"): 1, ("Trouser", "false"): 1,
        ("Dress", "true"): 1, ("Dress", "false"): 1,
        # first Shirt (brittle), T-shirt/top and Ankle boot, then Trouser (brittle)
        ("other", "true"): 2, ("other", "false"): 2,
        ("Shirt", "true"): 0, ("Shirt", "false"): 0,
        ("Bag", "true"): 1, ("Bag", "false"): 0,
    }  # fmt: skip


def test_class_label_setting_end_to_end(
    tmp_path: Path,
    new_version: VersionFactory,
    spawn_server: ServerFactory,
    onnx_path: Path,
    images: np.ndarray,
) -> None:
    """MARGINWATCH_CLASS_LABELS=2 in a real server, serving a version with a grid: the two
    classes its calibration predicted most get their own values, every other prediction counts
    as other, exactly as the responses labelled and flagged them; each budget has its series."""
    folder = new_version(tmp_path / "store", "fmnist", "v1", onnx=onnx_path, images=images)
    record = CalibrationRecord.model_validate_json((folder / RECORD_FILE).read_bytes())
    counts = [0, 0, 0, 7, 0, 0, 0, 0, 9, 0]  # Dress and Bag
    record = with_grid(
        record, [0.05, 0.1, 0.2], [0.8, 0.6, 0.3], [0.8, 0.7, 0.5], predicted_class_counts=counts
    )
    (folder / RECORD_FILE).write_text(record.model_dump_json())
    with spawn_server(tmp_path / "store", tmp_path / "logs", class_labels="2") as server:
        body = orjson.dumps({"inputs": images[:48].tolist()})
        response = httpx.post(f"{server.url}/v1/models/fmnist/predict", content=body, timeout=30)
        assert response.status_code == 200
        samples = parse(httpx.get(f"{server.url}/metrics", timeout=10).text)
    expected = {(name, flag): 0 for name in ("Dress", "Bag", "other") for flag in ("true", "false")}
    for item in response.json()["predictions"]:
        name = item["class_name"] if item["class_name"] in ("Dress", "Bag") else "other"
        expected[name, "true" if item["brittle"] else "false"] += 1
    assert exported(samples, PREDICTIONS, "class", "brittle", model="fmnist") == expected
    assert exported(samples, CALIBRATION, "eps", "served", model="fmnist") == {
        ("0.05", "false"): 0.8, ("0.1", "true"): 0.7, ("0.2", "false"): 0.5
    }  # fmt: skip
    assert exported(samples, LIVE, "eps", "served", model="fmnist") == pytest.approx(
        {("0.05", "false"): 0.8, ("0.1", "true"): 0.6, ("0.2", "false"): 0.3}
    )
