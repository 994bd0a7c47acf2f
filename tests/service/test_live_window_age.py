"""The live window forgets by age as well as by count, so a quiet replica's gauge empties instead
of freezing, and its size is exported for the alerts' per-replica guard."""

from __future__ import annotations

import time

import numpy as np
import pytest

from marginwatch.artifact.store import current_dir, default_store, read_record
from marginwatch.service.engine import Prediction
from marginwatch.service.live_window import LiveWindow
from marginwatch.service.metrics import ServiceMetrics
from metrics_text import parse


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_predictions_older_than_the_age_bound_leave_the_window() -> None:
    clock = Clock()
    window = LiveWindow(5, max_age_s=60, clock=clock)
    window.add(np.array([1.0, 1.0]))
    clock.now += 30
    assert window.add(np.array([0.0])) == pytest.approx(2 / 3)
    clock.now += 30  # the first two are exactly 60 s old: still in
    assert len(window) == 3
    clock.now += 0.001
    assert len(window) == 1 and window.mean() == 0.0
    clock.now += 60
    assert len(window) == 0 and np.isnan(window.mean())
    # the count bound still holds, and the ring keeps working after emptying by age
    assert window.add(np.arange(8, dtype=float)) == pytest.approx(5.0)  # 3..7
    assert len(window) == 5


def test_age_and_count_bounds_together_keep_an_exact_mean() -> None:
    rng = np.random.default_rng(0)
    clock = Clock()
    window = LiveWindow(50, max_age_s=10, clock=clock)
    history: list[tuple[float, float]] = []
    for _ in range(2000):
        clock.now += float(rng.exponential(0.3))
        values = rng.random(int(rng.integers(1, 6)))
        history += [(clock.now, value) for value in values]
        window.add(values)
        recent = [value for at, value in history[-50:] if at >= clock.now - 10]
        assert len(window) == len(recent)
        assert window.mean() == pytest.approx(float(np.mean(recent)), abs=1e-12)


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="max_age_s > 0"):
        LiveWindow(5, max_age_s=0)


def test_window_size_gauge_falls_when_traffic_stops() -> None:
    record = read_record(current_dir(default_store(), "fmnist-cnn-pgd"))
    metrics = ServiceMetrics(100, live_window_s=0.2)
    scores = np.linspace(-1, 1, 7, dtype=np.float32)
    prediction = Prediction.without_answers(
        np.zeros((7, 10), np.float32), scores, np.zeros(7, np.int64),
        scores < record.threshold, np.zeros(7, bool),
    )  # fmt: skip
    metrics.observe_batch("m", record, prediction, 0.001)

    def exported() -> dict[str, float]:
        samples = parse(metrics.exposition().decode())
        return {name: v for (name, _), v in samples.items() if name.startswith("marginwatch_live_")}

    first = exported()
    assert first["marginwatch_live_window_predictions"] == 7
    assert 0 <= first["marginwatch_live_robust_accuracy_ratio"] <= 1
    time.sleep(0.3)
    assert exported() == {"marginwatch_live_window_predictions": 0}
