"""Units without a server: the batcher, the live window, settings, and the import without torch."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import numpy as np
import pytest
from pydantic import ValidationError

from marginwatch.artifact.schema import Curve
from marginwatch.service.batcher import MicroBatcher
from marginwatch.service.engine import Prediction
from marginwatch.service.errors import ModelNotReady, Overloaded
from marginwatch.service.metrics import LiveWindow, ServedTraffic
from marginwatch.service.settings import Settings


def echo(x: np.ndarray) -> Prediction:
    """A toy model with exact outputs: the score of a sample is its first value."""
    scores = x.reshape(len(x), -1)[:, 0].copy()
    return Prediction(
        logits=x.reshape(len(x), -1),
        scores=scores,
        labels=np.zeros(len(x), dtype=np.int64),
        brittle=scores < 0.5,
        borderline=np.zeros(len(x), dtype=bool),
    )


@pytest.mark.parametrize("inline_max_samples", [0, 8], ids=["thread", "inline"])
def test_batcher_gathers_requests_and_returns_each_its_rows(inline_max_samples: int) -> None:
    sizes: list[int] = []

    def run(x: np.ndarray) -> Prediction:
        sizes.append(len(x))
        return echo(x)

    async def scenario() -> list[Prediction]:
        batcher = MicroBatcher(
            run,
            max_batch_size=8,
            max_wait_s=0.05,
            max_queue_samples=64,
            inline_max_samples=inline_max_samples,
        )
        batcher.start()
        requests = [np.full((1 + i % 3, 2), float(i), dtype=np.float32) for i in range(12)]
        results = await asyncio.gather(*(batcher.submit(x) for x in requests))
        await batcher.close()
        return results

    results = asyncio.run(scenario())
    for i, result in enumerate(results):
        assert len(result) == 1 + i % 3
        assert (result.scores == float(i)).all()
    assert max(sizes) <= 8 and sum(sizes) == sum(1 + i % 3 for i in range(12))
    assert len(sizes) < 12  # requests were gathered


def test_batcher_rejects_when_full_and_after_close() -> None:
    async def scenario() -> None:
        batcher = MicroBatcher(echo, max_batch_size=4, max_wait_s=0, max_queue_samples=4)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(np.zeros((4, 1), dtype=np.float32)))
        await asyncio.sleep(0)  # queued, not yet taken: the queue holds 4 of 4 samples
        with pytest.raises(Overloaded, match="retry later"):
            await batcher.submit(np.zeros((1, 1), dtype=np.float32))
        await batcher.close()
        assert len(await first) == 4  # close served what was queued
        with pytest.raises(ModelNotReady):
            await batcher.submit(np.zeros((1, 1), dtype=np.float32))

    asyncio.run(scenario())


def test_batcher_passes_model_errors_to_every_waiter_and_goes_on() -> None:
    calls = []

    def fails_once(x: np.ndarray) -> Prediction:
        calls.append(len(x))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return echo(x)

    async def scenario() -> None:
        batcher = MicroBatcher(fails_once, max_batch_size=4, max_wait_s=0.05, max_queue_samples=8)
        batcher.start()
        results = await asyncio.gather(
            *(batcher.submit(np.zeros((1, 1), dtype=np.float32)) for _ in range(3)),
            return_exceptions=True,
        )
        assert all(isinstance(result, RuntimeError) for result in results)
        assert len(await batcher.submit(np.ones((2, 1), dtype=np.float32))) == 2
        await batcher.close()

    asyncio.run(scenario())


def test_live_window_is_a_rolling_mean() -> None:
    window = LiveWindow(4)
    assert window.add(np.array([1.0, 1.0])) == 1.0
    assert window.add(np.array([0.0, 0.0, 0.0])) == 0.25  # holds 1, 0, 0, 0
    assert window.add(np.arange(10, dtype=float)) == 7.5  # the last four: 6..9
    assert len(window) == 4


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"MARGINWATCH_MAX_BATCH_SIZE": "0"}, "max_batch_size"),
        ({"MARGINWATCH_PORT": "70000"}, "port"),
        ({"MARGINWATCH_MAX_BATCH_WAIT_S": "-1"}, "max_batch_wait_s"),
        ({"MARGINWATCH_MAX_INPUTS_PER_REQUEST": "128"}, "must not exceed max_batch_size"),
        ({"MARGINWATCH_API_KEYS": "short"}, "at least 8 characters"),
        ({"MARGINWATCH_LOG_FORMAT": "xml"}, "log_format"),
    ],
)
def test_bad_settings_fail_with_a_message(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], words: str
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError, match=words):
        Settings()


def test_settings_lists_are_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MARGINWATCH_MODELS", "a, b,c")
    monkeypatch.setenv("MARGINWATCH_API_KEYS", "key-number-1,key-number-2")
    settings = Settings()
    assert settings.models == ["a", "b", "c"]
    assert [key.get_secret_value() for key in settings.api_keys] == ["key-number-1", "key-number-2"]


def test_service_imports_without_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import marginwatch.service.app, marginwatch.service.__main__\n"
        "marginwatch.service.app.create_app(marginwatch.service.settings.Settings(store='/nonexistent'))\n"
        "assert sys.modules['torch'] is None\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_console_script_help_explains_every_option() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "marginwatch.service", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    for option in ("--host", "--port", "--store", "--models", "--log-format", "--log-level"):
        assert option in result.stdout


def test_batcher_waits_to_fill_and_goes_at_once_when_full() -> None:
    sizes: list[int] = []

    def run(x: np.ndarray) -> Prediction:
        sizes.append(len(x))
        return echo(x)

    async def scenario() -> tuple[float, float]:
        batcher = MicroBatcher(run, max_batch_size=4, max_wait_s=0.2, max_queue_samples=16,
                               inline_max_samples=4)  # fmt: skip
        batcher.start()
        loop = asyncio.get_running_loop()
        started = loop.time()
        await batcher.submit(np.zeros((1, 1), dtype=np.float32))  # alone: waits max_wait_s
        alone = loop.time() - started
        started = loop.time()
        one = np.zeros((1, 1), dtype=np.float32)
        await asyncio.gather(*(batcher.submit(one) for _ in range(4)))
        full = loop.time() - started  # four samples fill the batch: no wait
        await batcher.close()
        return alone, full

    alone, full = asyncio.run(scenario())
    assert alone >= 0.19
    assert full < 0.1
    assert sizes == [1, 4]


def test_batcher_close_sends_a_waiting_batch_at_once() -> None:
    async def scenario() -> float:
        batcher = MicroBatcher(echo, max_batch_size=8, max_wait_s=5.0, max_queue_samples=8)
        batcher.start()
        waiting = asyncio.ensure_future(batcher.submit(np.ones((2, 1), dtype=np.float32)))
        await asyncio.sleep(0.01)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await batcher.close()
        assert len(await waiting) == 2
        return loop.time() - started

    assert asyncio.run(scenario()) < 1.0  # not the 5 s wait


def test_served_traffic_folds_batches_into_prometheus_families() -> None:
    traffic = ServedTraffic(window_predictions=4)
    low = Curve(knots_x=[0.0, 1.0], knots_y=[0.0, 1.0])
    high = Curve(knots_x=[0.0, 1.0], knots_y=[1.0, 1.0])
    traffic.record("m", low, echo(np.array([[0.0], [0.5], [1.0]], dtype=np.float32)), 0.0005)
    traffic.record("m", high, echo(np.array([[0.2]], dtype=np.float32)), 0.003)
    traffic.record_request("m", "v1_predict", 200, 0.001)
    traffic.record_request("m", "v1_predict", 404, 0.0001)
    traffic.watch_queue("m", lambda: 7)
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in traffic.collect()
        for sample in family.samples
    }

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted({"model": "m", **labels}.items())))]

    assert value("marginwatch_batch_size_count") == 2
    assert value("marginwatch_batch_size_sum") == 4
    assert value("marginwatch_batch_size_bucket", le="1.0") == 1
    assert value("marginwatch_batch_size_bucket", le="4.0") == 2
    # `le` buckets: 0.5 counts in le="0.5", as prometheus_client's own histograms count it
    assert value("marginwatch_score_bucket", le="0.5") == 3  # 0.0, 0.2, 0.5
    assert value("marginwatch_score_count") == 4
    assert value("marginwatch_score_sum") == pytest.approx(1.7)
    assert value("marginwatch_model_execution_seconds_bucket", le="0.0005") == 1
    assert value("marginwatch_predictions_total", brittle="true") == 2  # scores 0.0 and 0.2
    assert value("marginwatch_predictions_total", brittle="false") == 2
    # g of each batch comes from its own version's curve: 0, 0.5, 1 and then 1
    assert value("marginwatch_live_robust_accuracy_ratio") == pytest.approx(2.5 / 4)
    assert value("marginwatch_live_window_predictions") == 4
    assert value("marginwatch_queued_samples") == 7
    assert value("marginwatch_requests_total", endpoint="v1_predict", status_class="2xx") == 1
    assert value("marginwatch_requests_total", endpoint="v1_predict", status_class="4xx") == 1
    assert value("marginwatch_request_duration_seconds_count", endpoint="v1_predict") == 2


def test_served_traffic_folds_on_its_own_when_nobody_scrapes() -> None:
    traffic = ServedTraffic(window_predictions=10)
    curve = Curve(knots_x=[0.0], knots_y=[1.0])
    for _ in range(ServedTraffic.FOLD_EVERY + 5):
        traffic.record("m", curve, echo(np.zeros((1, 1), dtype=np.float32)), 0.001)
        traffic.record_request("m", "v1_predict", 200, 0.001)
    assert traffic.pending() < ServedTraffic.FOLD_EVERY  # memory stays bounded


def test_batcher_runs_lone_requests_at_once_and_batches_again_under_load() -> None:
    sizes: list[int] = []

    def run(x: np.ndarray) -> Prediction:
        sizes.append(len(x))
        return echo(x)

    async def scenario() -> None:
        batcher = MicroBatcher(run, max_batch_size=64, max_wait_s=0, max_queue_samples=256,
                               inline_max_samples=64)  # fmt: skip
        batcher.start()
        one = np.zeros((1, 1), dtype=np.float32)
        for _ in range(MicroBatcher.ALONE_STREAK):  # one request at a time: batches of one
            await batcher.submit(one)
        turns: list[bool] = []
        asyncio.get_running_loop().call_soon(turns.append, True)
        await batcher.submit(one)
        assert not turns  # served without giving the loop a turn
        sizes.clear()
        await asyncio.gather(*(batcher.submit(one) for _ in range(64)))
        assert max(sizes) > 1  # a probe request found company: batching again
        sizes.clear()
        await asyncio.gather(*(batcher.submit(one) for _ in range(64)))
        assert sizes == [64]
        await batcher.close()

    asyncio.run(scenario())
