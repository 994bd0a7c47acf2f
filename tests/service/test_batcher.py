"""The micro-batcher with a toy model: batches form, each request gets its own rows, a full queue
and a closed batcher refuse, failures reach every waiter, waiting and lone requests."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from marginwatch.service.batcher import MicroBatcher, RunBatch
from marginwatch.service.engine import Prediction
from marginwatch.service.errors import ModelNotReady, Overloaded


def counting(run: RunBatch, sizes: list[int]) -> RunBatch:
    """`run` that also appends each batch's size to `sizes`."""

    def run_and_count(x: np.ndarray) -> Prediction:
        sizes.append(len(x))
        return run(x)

    return run_and_count


@pytest.mark.parametrize("inline_max_samples", [0, 8], ids=["thread", "inline"])
def test_batcher_gathers_requests_and_returns_each_its_rows(
    toy_model: RunBatch, inline_max_samples: int
) -> None:
    sizes: list[int] = []

    async def scenario() -> list[Prediction]:
        batcher = MicroBatcher(
            counting(toy_model, sizes),
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


def test_batcher_rejects_when_full_and_after_close(toy_model: RunBatch) -> None:
    async def scenario() -> None:
        batcher = MicroBatcher(toy_model, max_batch_size=4, max_wait_s=0, max_queue_samples=4)
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


def test_batcher_passes_model_errors_to_every_waiter_and_goes_on(toy_model: RunBatch) -> None:
    calls = []

    def fails_once(x: np.ndarray) -> Prediction:
        calls.append(len(x))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return toy_model(x)

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


def test_batcher_waits_to_fill_and_goes_at_once_when_full(toy_model: RunBatch) -> None:
    sizes: list[int] = []

    async def scenario() -> tuple[float, float]:
        batcher = MicroBatcher(counting(toy_model, sizes), max_batch_size=4, max_wait_s=0.2,
                               max_queue_samples=16, inline_max_samples=4)  # fmt: skip
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


def test_batcher_close_sends_a_waiting_batch_at_once(toy_model: RunBatch) -> None:
    async def scenario() -> float:
        batcher = MicroBatcher(toy_model, max_batch_size=8, max_wait_s=5.0, max_queue_samples=8)
        batcher.start()
        waiting = asyncio.ensure_future(batcher.submit(np.ones((2, 1), dtype=np.float32)))
        await asyncio.sleep(0.01)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await batcher.close()
        assert len(await waiting) == 2
        return loop.time() - started

    assert asyncio.run(scenario()) < 1.0  # not the 5 s wait


def test_batcher_runs_lone_requests_at_once_and_batches_again_under_load(
    toy_model: RunBatch,
) -> None:
    sizes: list[int] = []

    async def scenario() -> None:
        batcher = MicroBatcher(counting(toy_model, sizes), max_batch_size=64, max_wait_s=0,
                               max_queue_samples=256, inline_max_samples=64)  # fmt: skip
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


def test_small_batches_leave_the_loops_thread_only_when_work_waits_behind_them(
    toy_model: RunBatch,
) -> None:
    """Inline by default; in the model's thread while the backlog hint says requests wait for
    admission, and for a batch that leaves requests queued behind it (the queue held more than
    one batch)."""
    waiting = False
    threads: list[tuple[int, int]] = []  # (batch size, thread that ran it)

    def recording(x: np.ndarray) -> Prediction:
        threads.append((len(x), threading.get_ident()))
        return toy_model(x)

    async def scenario() -> int:
        batcher = MicroBatcher(recording, max_batch_size=4, max_wait_s=0, max_queue_samples=64,
                               inline_max_samples=4, backlog=lambda: waiting)  # fmt: skip
        batcher.start()
        two = np.zeros((2, 1), dtype=np.float32)
        await asyncio.gather(*(batcher.submit(two) for _ in range(2)))  # one batch, nothing behind
        nonlocal waiting
        waiting = True
        await asyncio.gather(*(batcher.submit(two) for _ in range(2)))  # requests wait: thread
        waiting = False
        await asyncio.gather(*(batcher.submit(two) for _ in range(4)))  # two batches: the first
        await batcher.close()  # leaves the second behind it (thread), the second runs inline
        return threading.get_ident()

    loop_thread = asyncio.run(scenario())
    assert [size for size, _ in threads] == [4, 4, 4, 4]
    on_loop = [thread == loop_thread for _, thread in threads]
    assert on_loop == [True, False, False, True]


@pytest.mark.parametrize("lone", [False, True], ids=["queued", "lone"])
def test_a_request_past_its_deadline_is_never_run(toy_model: RunBatch, lone: bool) -> None:
    """Issue 19, item 11: the lone-request path ran a request whose deadline had passed while
    its body decoded (200 after 15 s with a 1 s deadline). Every path refuses it now."""
    sizes: list[int] = []

    async def scenario() -> None:
        batcher = MicroBatcher(
            counting(toy_model, sizes), max_batch_size=4, max_wait_s=0, max_queue_samples=8,
            inline_max_samples=4,
        )  # fmt: skip
        batcher.start()
        x = np.ones((1, 2), dtype=np.float32)
        for _ in range(MicroBatcher.ALONE_STREAK if lone else 0):
            await batcher.submit(x)  # one at a time: the next lone request would run at once
        ran = len(sizes)
        with pytest.raises(Overloaded, match="deadline passed") as refused:
            await batcher.submit(x, deadline=time.monotonic() - 0.5)
        assert refused.value.reason == "deadline"
        assert len(sizes) == ran  # the model never saw it
        assert len(await batcher.submit(x, deadline=time.monotonic() + 60)) == 1
        await batcher.close()

    asyncio.run(scenario())
