"""Units without a server: the batcher, the live window, settings, and the import without torch."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import numpy as np
import pytest
from pydantic import ValidationError

from service.batcher import MicroBatcher
from service.engine import Prediction
from service.errors import ModelNotReady, Overloaded
from service.metrics import LiveWindow
from service.settings import Settings


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
        "import service.app, service.__main__\n"
        "service.app.create_app(service.settings.Settings(store='/nonexistent'))\n"
        "assert sys.modules['torch'] is None\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_console_script_help_explains_every_option() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service", "--help"], capture_output=True, text=True, check=True
    )
    for option in ("--host", "--port", "--store", "--models", "--log-format", "--log-level"):
        assert option in result.stdout
