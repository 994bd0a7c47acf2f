"""A micro-batcher: concurrent requests to one model are gathered into one execution.

One public coroutine, `submit(x, deadline)`. Requests queue in a bounded deque (counted in
samples); a full queue rejects with `Overloaded` at once instead of blocking (`check_room` lets a
caller learn that before it reads a request's body). A request whose batch has not started by its
deadline is answered `Overloaded` and dropped, never run, and so is one whose caller stopped
waiting (its future cancelled): the head of the queue is checked at each dispatch, and by a timer
while a batch runs in the model's thread. There is no worker task: a request that finds no dispatch
pending schedules one with `call_soon`, so it runs after every handler that is ready in the same
turn of the event loop has queued its request too; the dispatch takes the requests queued at that
moment (up to `max_batch_size` samples), waits up to `max_wait_s` for more if the batch is not
full, and runs the model. Batches of at most `inline_max_samples` run right there on the event
loop's thread: for a small model on few cores a thread hop costs more than the execution
(docs/benchmarks.md). Larger ones run in the model's own thread, so the loop keeps parsing and
answering meanwhile, and requests that arrive form the next batch, dispatched when that execution
ends. So does a small one while requests are left queued behind it or wait for admission
(`backlog`): then the loop has more work than this batch, and the model's time on another core is
time the loop gains (at concurrency 1,000 on 2 cores, inline: 1.0 core used, about 1,100 answers/s;
in the thread: 1.5 cores, about 1,450; "Overload and memory"). When requests come one at a time
(the last batches each held one, and nothing is queued or running), a small request runs at once,
without the loop turn that would let others join it; every 16th such request takes the usual way,
so a rise in traffic turns batching back on. Each request gets back exactly its own rows. The model
is deterministic per sample, so a sample's result does not depend on which batch it lands in (the
batch-invariance test holds the engine to that).

Requests of a transport that hands the loop one new request per round trip (gRPC: `grpc.aio`
accepts one call at a time, each through its completion-queue thread) never meet in one loop
turn, so that rule alone would never batch them: such a caller says how much company its request
may find (`company`: calls of its kind in progress, itself included). A batch whose first request
expects company, or whose model's last such batch had some, waits up to `gather_s` (1 ms, the
shortest timer uvloop keeps) for it and goes as soon as it is there; the last such batch's number
of those calls is remembered, so clients that come back together are awaited together, and a wait
that found nobody ends the waiting until calls overlap again. Requests of any transport join a
waiting batch and count as its company.

A request whose deadline has already passed when it is submitted (its body took that long to
arrive or to decode) is refused at once, before either path: the lone path never queues it.

`submit` enqueues before its first suspension point: a caller that looked the batcher up and
submits without awaiting in between is sure to be served even if `close()` is called right after.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np

from marginwatch.service.engine import Prediction
from marginwatch.service.errors import ModelNotReady, Overloaded

RunBatch = Callable[[np.ndarray], Prediction]


@dataclass(slots=True)
class _Pending:
    x: np.ndarray
    future: asyncio.Future[Prediction]
    queued_at: float
    deadline: float  # time.monotonic() by which its batch must start
    company: int  # requests its batch should wait for, itself included (0: any transport's turn)


class MicroBatcher:
    """Batches `submit(x)` calls into calls of `run(batch)`; start with `start()`, end with
    `close()`, which serves everything already queued before returning."""

    ALONE_STREAK = 8
    PROBE_EVERY = 16
    GATHER_S = 0.001  # uvloop rounds a timer to whole milliseconds: a shorter wait is no wait

    def __init__(
        self,
        run: RunBatch,
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue_samples: int,
        inline_max_samples: int = 0,
        backlog: Callable[[], bool] = lambda: False,
        name: str = "model",
        gather_s: float = GATHER_S,
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
        self._backlog = backlog  # whether requests are waiting for the loop (admission's room)
        self._gather_s = gather_s
        self._name = name
        self._pending: deque[_Pending] = deque()
        self._queued_samples = 0
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._dispatch_due: asyncio.Handle | None = None  # a `_dispatch` call is scheduled
        self._waiting_to_fill = False  # ... and it is a `max_wait_s` timer
        self._executing = False  # a batch runs in the model's thread
        self._expiry_due: asyncio.TimerHandle | None = None  # expires queued requests meanwhile
        self._idle = asyncio.Event()  # nothing queued, nothing executing
        self._idle.set()
        self._alone_streak = 0  # consecutive dispatched batches that held one request
        self._alone_runs = 0
        self._company = 0  # calls that gave `company` in the last batch one of them headed

    @property
    def queued_samples(self) -> int:
        return self._queued_samples

    def check_room(self, size: int = 1) -> None:
        """Raise `Overloaded` unless `size` more samples fit in the queue now."""
        if self._queued_samples + size > self._max_queue_samples:
            raise Overloaded(
                f"model {self._name!r} has {self._queued_samples} samples queued "
                f"(limit {self._max_queue_samples}); retry later",
                "queue_full",
            )

    def start(self) -> None:
        if self._loop is not None:
            raise RuntimeError("batcher already started")
        self._loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"run-{self._name}")

    async def submit(
        self, x: np.ndarray, deadline: float | None = None, *, company: int = 0
    ) -> Prediction:
        """The prediction for the samples of `x` (1 to `max_batch_size` of them), or
        `Overloaded` if their batch has not started by `deadline` (`time.monotonic()`).
        `company`: from a transport whose requests never share a loop turn, how many of its
        requests are in progress, this one included (see the module's docstring)."""
        size = len(x)
        if not 0 < size <= self._max_batch_size:
            raise ValueError(f"a request holds 1 to {self._max_batch_size} samples, not {size}")
        if self._closing or self._loop is None:
            raise ModelNotReady(f"model {self._name!r} is not taking requests")
        self.check_room(size)
        now = time.monotonic()
        due = math.inf if deadline is None else deadline
        if due <= now:  # on every path, the lone request's too: its batch could not start in time
            raise Overloaded(
                f"model {self._name!r}: the request's deadline passed {now - due:.3f} s before "
                "it reached the queue; retry later",
                "deadline",
            )
        if company and not self._pending:  # it heads a batch: the last one's company counts
            company = max(company, self._company)
        if company < 2 and self._may_run_alone(size):
            return self._run(x)
        future: asyncio.Future[Prediction] = self._loop.create_future()
        self._pending.append(_Pending(x, future, now, due, company))
        self._queued_samples += size
        self._idle.clear()
        if self._executing:
            self._watch_expiry()
        else:
            self._schedule()
        return await future

    def _may_run_alone(self, size: int) -> bool:
        """Whether this request may skip the loop turn that lets others join its batch: the
        batcher is idle and the last `ALONE_STREAK` batches each held a single request (so
        nobody is likely to join), except every `PROBE_EVERY`-th such request, which goes the
        usual way to find out whether traffic has picked up again."""
        if (
            self._alone_streak < self.ALONE_STREAK
            or self._pending
            or self._dispatch_due is not None
            or self._executing
            or size > self._inline_max_samples
            or self._max_wait_s > 0
        ):
            return False
        self._alone_runs += 1
        return self._alone_runs % self.PROBE_EVERY != 0

    async def close(self) -> None:
        """Stop taking requests, serve those queued, then stop the model's thread."""
        self._closing = True
        if self._loop is None:
            return
        self._schedule()  # a batch waiting to fill goes now
        await self._idle.wait()
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def _schedule(self) -> None:
        """Make sure a dispatch follows: soon, or when the running execution ends."""
        if self._executing or self._loop is None:
            return
        if self._dispatch_due is not None:
            full = self._queued_samples >= self._max_batch_size
            if not (self._waiting_to_fill and (full or self._closing or self._company_came())):
                return
            self._dispatch_due.cancel()  # the batch filled up before its wait ended
        self._waiting_to_fill = False
        self._dispatch_due = self._loop.call_soon(self._dispatch)

    def _company_came(self) -> bool:
        """Whether the request just queued completes the company the batch waits for."""
        return bool(self._pending) and 1 < self._pending[0].company == len(self._pending)

    def _dispatch(self, waited: bool = False) -> None:
        self._dispatch_due = None
        self._waiting_to_fill = False
        self._expire()
        if not self._pending:
            self._idle.set()
            return
        if self._must_wait(waited):
            return
        gathering = self._pending[0].company > 0
        batch = self._take()
        if gathering:  # the company to expect next time: the calls of its kind that came
            self._company = sum(item.company > 0 for item in batch)
        if not batch:  # every request taken had been given up by its caller
            self._next_or_idle()
            return
        self._alone_streak = self._alone_streak + 1 if len(batch) == 1 else 0
        inputs = batch[0].x if len(batch) == 1 else np.concatenate([item.x for item in batch])
        if len(inputs) <= self._inline_max_samples and not (self._pending or self._backlog()):
            try:
                prediction = self._run(inputs)
            except Exception as error:  # every waiter learns of the failure; serving goes on
                _fail(batch, error)
            else:
                _deliver(batch, prediction)
            self._next_or_idle()
            return
        assert self._loop is not None and self._executor is not None
        self._executing = True
        execution = self._loop.run_in_executor(self._executor, self._run, inputs)
        execution.add_done_callback(partial(self._finished, batch))
        self._watch_expiry()

    def _must_wait(self, waited: bool) -> bool:
        """Whether the batch should wait to fill: `max_wait_s` after its first request, and up
        to `gather_s` while the company that request expects has not all come; never when it
        is full or the batcher is closing. Schedules the dispatch at the deadline. A dispatch
        at the end of a wait does not wait again: uvloop's timers keep whole milliseconds of
        the loop's cached clock and often fire before `time.monotonic()` reaches the deadline,
        and waiting out the rest (by `call_soon`, under half a millisecond) spun the loop."""
        if waited or self._closing or self._queued_samples >= self._max_batch_size:
            return False
        head = self._pending[0]
        wait = self._max_wait_s
        if len(self._pending) < head.company:
            wait = max(wait, self._gather_s)
        remaining = head.queued_at + wait - time.monotonic()
        if remaining <= 0:
            return False
        assert self._loop is not None
        self._dispatch_due = self._loop.call_later(remaining, self._dispatch, True)
        self._waiting_to_fill = True
        return True

    def _finished(self, batch: list[_Pending], execution: asyncio.Future[Prediction]) -> None:
        self._executing = False
        if self._expiry_due is not None:  # the next dispatch expires what is due
            self._expiry_due.cancel()
            self._expiry_due = None
        error = execution.exception()
        if error is not None:
            _fail(batch, error)
        else:
            _deliver(batch, execution.result())
        self._next_or_idle()

    def _next_or_idle(self) -> None:
        """After a batch: dispatch the next one, or mark the batcher idle (close waits for it)."""
        if self._pending:
            self._schedule()
        else:
            self._idle.set()

    def _take(self) -> list[_Pending]:
        """Up to `max_batch_size` samples from the head of the queue, leaving out requests whose
        caller gave up or whose deadline has passed: they are never run."""
        batch: list[_Pending] = []
        taken = 0
        limit = self._max_batch_size
        now = time.monotonic()
        while self._pending and (not taken or taken + len(self._pending[0].x) <= limit):
            item = self._pending.popleft()
            self._queued_samples -= len(item.x)
            if item.deadline <= now:
                self._refuse_late(item, now)
            elif not item.future.done():
                batch.append(item)
                taken += len(item.x)
        return batch

    def _expire(self) -> None:
        """Drop the requests at the head of the queue whose deadline has passed. Deadlines come
        nearly in queue order (arrival plus one time-out); one that does not is caught by
        `_take`."""
        now = time.monotonic()
        while self._pending and self._pending[0].deadline <= now:
            item = self._pending.popleft()
            self._queued_samples -= len(item.x)
            self._refuse_late(item, now)

    def _refuse_late(self, item: _Pending, now: float) -> None:
        if not item.future.done():
            item.future.set_exception(
                Overloaded(
                    f"model {self._name!r}: the request's deadline passed after "
                    f"{now - item.queued_at:.3f} s in the queue; retry later",
                    "deadline",
                )
            )

    def _watch_expiry(self) -> None:
        """While a batch runs in the model's thread, answer queued requests when their deadline
        passes rather than when it ends (a slow model may take longer than their wait). A batch
        that runs on the loop's thread blocks this timer anyway: the next dispatch drops them."""
        if self._expiry_due is not None or not self._pending:
            return
        deadline = self._pending[0].deadline
        if deadline == math.inf:
            return
        assert self._loop is not None
        delay = max(0.0, deadline - time.monotonic())
        self._expiry_due = self._loop.call_later(delay, self._expire_while_executing)

    def _expire_while_executing(self) -> None:
        self._expiry_due = None
        self._expire()
        self._watch_expiry()


def _deliver(batch: list[_Pending], prediction: Prediction) -> None:
    """Each waiter gets its own rows; a client that went away has cancelled its future."""
    if len(batch) == 1:
        if not batch[0].future.done():
            batch[0].future.set_result(prediction)
        return
    start = 0
    for item in batch:
        stop = start + len(item.x)
        if not item.future.done():
            item.future.set_result(prediction.take(start, stop))
        start = stop


def _fail(batch: list[_Pending], error: BaseException) -> None:
    for item in batch:
        if not item.future.done():
            item.future.set_exception(error)
