"""A micro-batcher: concurrent requests to one model are gathered into one execution.

One public coroutine, `submit(x)`. Requests queue in a bounded deque (counted in samples); a full
queue rejects with `Overloaded` at once instead of blocking. A single worker task takes the
requests queued at that moment (up to `max_batch_size` samples), waits up to `max_wait_s` for
more if the batch is not full, and runs the model in a dedicated thread, so the event loop keeps
parsing and answering while the model executes; requests that arrive meanwhile form the next
batch. Batches of at most `inline_max_samples` run on the event loop's own thread instead: for a
small model on few cores the thread hop costs more than the execution (docs/benchmarks.md).
Each request gets back exactly its own rows. The model is deterministic per sample, so a
sample's result does not depend on which batch it lands in (the batch-invariance test holds the
engine to that).

`submit` enqueues before its first suspension point: a caller that looked the batcher up and
submits without awaiting in between is sure to be served even if `close()` is called right after.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from service.engine import Prediction
from service.errors import ModelNotReady, Overloaded

RunBatch = Callable[[np.ndarray], Prediction]


@dataclass
class _Pending:
    x: np.ndarray
    future: asyncio.Future[Prediction]
    queued_at: float = field(default_factory=time.monotonic)


class MicroBatcher:
    """Batches `submit(x)` calls into calls of `run(batch)`; start with `start()`, end with
    `close()`, which serves everything already queued before returning."""

    def __init__(
        self,
        run: RunBatch,
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue_samples: int,
        inline_max_samples: int = 0,
        name: str = "model",
    ) -> None:
        if max_batch_size <= 0 or max_queue_samples < max_batch_size or max_wait_s < 0:
            raise ValueError(
                "need max_batch_size > 0, max_queue_samples >= max_batch_size, max_wait_s >= 0"
            )
        self._run = run
        self._max_batch_size = max_batch_size
        self._max_wait_s = max_wait_s
        self._max_queue_samples = max_queue_samples
        self._inline_max_samples = inline_max_samples
        self._name = name
        self._pending: deque[_Pending] = deque()
        self._queued_samples = 0
        self._wakeup = asyncio.Event()
        self._closing = False
        self._worker: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def queued_samples(self) -> int:
        return self._queued_samples

    def start(self) -> None:
        if self._worker is not None:
            raise RuntimeError("batcher already started")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"run-{self._name}")
        self._worker = asyncio.get_running_loop().create_task(
            self._work(), name=f"batcher-{self._name}"
        )

    async def submit(self, x: np.ndarray) -> Prediction:
        """The prediction for the samples of `x` (1 to `max_batch_size` of them)."""
        size = len(x)
        if not 0 < size <= self._max_batch_size:
            raise ValueError(f"a request holds 1 to {self._max_batch_size} samples, not {size}")
        if self._closing or self._worker is None:
            raise ModelNotReady(f"model {self._name!r} is not taking requests")
        if self._queued_samples + size > self._max_queue_samples:
            raise Overloaded(
                f"model {self._name!r} has {self._queued_samples} samples queued "
                f"(limit {self._max_queue_samples}); retry later"
            )
        future: asyncio.Future[Prediction] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(x, future))
        self._queued_samples += size
        self._wakeup.set()
        return await future

    async def close(self) -> None:
        """Stop taking requests, serve those queued, then stop the worker and its thread."""
        self._closing = True
        self._wakeup.set()
        if self._worker is not None:
            await self._worker
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    async def _work(self) -> None:
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._fill()
            await self._execute(self._take())

    async def _fill(self) -> None:
        """Wait until the batch is full, `max_wait_s` after its first request, or closing."""
        if self._max_wait_s <= 0:
            return
        deadline = self._pending[0].queued_at + self._max_wait_s
        while self._queued_samples < self._max_batch_size and not self._closing:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _take(self) -> list[_Pending]:
        batch = [self._pending.popleft()]
        taken = len(batch[0].x)
        while self._pending and taken + len(self._pending[0].x) <= self._max_batch_size:
            item = self._pending.popleft()
            batch.append(item)
            taken += len(item.x)
        self._queued_samples -= taken
        return batch

    async def _execute(self, batch: list[_Pending]) -> None:
        inputs = batch[0].x if len(batch) == 1 else np.concatenate([item.x for item in batch])
        loop = asyncio.get_running_loop()
        try:
            if len(inputs) <= self._inline_max_samples:
                prediction = self._run(inputs)
            else:
                prediction = await loop.run_in_executor(self._executor, self._run, inputs)
        except Exception as error:  # every waiter learns of the failure; the worker goes on
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(error)
            return
        start = 0
        for item in batch:
            stop = start + len(item.x)
            if not item.future.done():  # a client that went away cancels its future
                item.future.set_result(prediction.take(start, stop))
            start = stop
