"""Sampled live traffic: a fraction of the served inputs, with the label, score, flag and
calibration version they were served with, written as shard files (`artifact/traffic.py`) for the
calibration job, which checks the flag on them (`marginwatch-calibrate --traffic`).

The request path never touches the disk. `offer` runs in the batch runner after each model
execution; each input is kept with probability `rate`, decided by a countdown to the next kept
input (gaps drawn from the geometric distribution: the same Bernoulli sampling, at the cost of
one subtraction per batch when nothing is kept). Kept rows go to a bounded queue; when it is
full they are dropped and counted. A background thread groups the queue by model and version
into shards, writes each atomically when it holds `shard_samples` or its oldest sample waited
`flush_s`, and at `stop()`; it deletes day folders past the retention and drops what would pass
the day's byte budget. What goes wrong on the disk (a full or read-only folder, one deleted under
it) costs samples, counted by reason and logged at most once a minute, never a request.
"""

from __future__ import annotations

import errno
import logging
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import numpy as np

from marginwatch.artifact.traffic import (
    DEFAULT_FILE_MODE,
    TrafficShard,
    day_bytes,
    day_folder,
    prune,
    write_shard,
)
from marginwatch.service.engine import Prediction
from marginwatch.service.metrics import ServiceMetrics, TrafficDropReason
from marginwatch.service.settings import DEFAULT_TRAFFIC_SAMPLE_RATE

logger = logging.getLogger("marginwatch.service")

WARN_EVERY_S: Final = 60.0
PRUNE_EVERY_S: Final = 3600.0
# Other replicas write to the same day folder: its size on disk is re-read this often, and this
# replica's own writes are added in between.
RECOUNT_EVERY_S: Final = 30.0
# npz headers and zip entries of a shard's seven arrays, on top of the arrays' bytes
SHARD_OVERHEAD_BYTES: Final = 2048
FULL_DISK: Final = {errno.ENOSPC, errno.EDQUOT}


@dataclass(slots=True)
class _Rows:
    """Kept rows of one batch."""

    model: str
    version: str
    inputs: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    brittle: np.ndarray
    served_at: float  # unix seconds

    def __len__(self) -> int:
        return len(self.inputs)


@dataclass(slots=True)
class _Buffer:
    """Rows of one model and version waiting to form a shard."""

    first_at: float  # time.monotonic() of its oldest rows
    rows: list[_Rows] = field(default_factory=list)
    samples: int = 0


@dataclass(slots=True)
class _DayUsage:
    day: str
    used_bytes: int
    counted_at: float  # time.monotonic()


class RateLimitedWarning:
    """A warning logged at most once per `every_s`, with a count of those held back."""

    def __init__(self, every_s: float = WARN_EVERY_S) -> None:
        self._every_s = every_s
        self._last = -math.inf
        self._held = 0

    def __call__(self, message: str, *args: object, exc_info: bool = False) -> None:
        now = time.monotonic()
        if now - self._last < self._every_s:
            self._held += 1
            return
        held, self._held, self._last = self._held, 0, now
        suffix = f" ({held} similar warnings held back)" if held else ""
        logger.warning(message + suffix, *args, exc_info=exc_info)


def warn_if_sampling_off(traffic_dir: Path | None, rate: float) -> bool:
    """Log, at start-up, a traffic folder set with the rate 0: the folder alone turns sampling
    on, so a 0 beside it is likely a leftover, and the check would later find no traffic."""
    if traffic_dir is None or rate > 0:
        return False
    logger.warning(
        "traffic sampling is off: MARGINWATCH_TRAFFIC_DIR is set (%s) but "
        "MARGINWATCH_TRAFFIC_SAMPLE_RATE is 0 (unset the rate to sample %g of the inputs, or "
        "unset the folder to silence this)",
        traffic_dir,
        DEFAULT_TRAFFIC_SAMPLE_RATE,
    )
    return True


def gap(rate: float, uniform: Callable[[], float] = random.random) -> int:
    """Inputs from one kept input to the next (1 = the very next) when each is kept with
    probability `rate`: geometric, by inversion."""
    if rate >= 1:
        return 1
    return 1 + int(math.log(1.0 - uniform()) / math.log1p(-rate))


class TrafficSampler:
    """Keeps a fraction of served inputs and writes them under `root` from its own thread;
    `start()` before serving, `stop()` after the batchers have drained."""

    def __init__(
        self,
        root: Path,
        metrics: ServiceMetrics,
        *,
        rate: float,
        max_bytes_per_day: int,
        retention_days: int,
        queue_samples: int,
        shard_samples: int,
        flush_s: float,
        file_mode: int = DEFAULT_FILE_MODE,
    ) -> None:
        if not 0 < rate <= 1:
            raise ValueError(f"rate must be in (0, 1], not {rate}")
        self._root = root
        self._metrics = metrics
        self._rate = rate
        self._max_bytes_per_day = max_bytes_per_day
        self._retention_days = retention_days
        self._queue_samples = queue_samples
        self._shard_samples = shard_samples
        self._flush_s = flush_s
        self._file_mode = file_mode
        self._countdown = gap(rate)  # inputs until the next kept one, that one included
        self._lock = threading.Lock()  # batches of several models finish on different threads
        self._queue: list[_Rows] = []
        self._queued = 0
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        # the writer thread's own state
        self._buffers: dict[tuple[str, str], _Buffer] = {}
        self._usage: dict[str, _DayUsage] = {}
        self._pruned_at: dict[str, float] = {}
        self._seq = 0
        self._warn = RateLimitedWarning()

    def offer(self, model: str, version: str, x: np.ndarray, prediction: Prediction) -> None:
        """One executed batch (on the request path: no I/O, no waiting)."""
        n = len(x)
        self._countdown -= n
        if self._countdown > 0:
            return
        kept = self._pick(n)
        served_at = time.time()
        if kept is not None and not len(kept):
            return
        if kept is None:  # every row: the batch's own arrays, which nothing writes to any more
            rows = _Rows(model, version, x, prediction.labels, prediction.scores,
                         prediction.brittle, served_at)  # fmt: skip
        else:
            rows = _Rows(model, version, x[kept], prediction.labels[kept],
                         prediction.scores[kept], prediction.brittle[kept], served_at)  # fmt: skip
        with self._lock:
            room = self._queued + len(rows) <= self._queue_samples
            if room:
                self._queue.append(rows)
                self._queued += len(rows)
            full_shard = self._queued >= self._shard_samples
        if not room:
            self._metrics.observe_traffic_dropped(model, "queue_full", len(rows))
        elif full_shard:
            self._wake.set()

    def _pick(self, n: int) -> np.ndarray | None:
        """The rows kept in a batch of `n` whose countdown ran out (None: all of them). Two
        threads may share the countdown (batches of two models, or of two versions during a
        reload): a race then only shifts which rows are kept, so it is not locked."""
        index = min(max(self._countdown + n - 1, 0), n)
        kept: list[int] = []
        while index < n:
            kept.append(index)
            index += gap(self._rate)
        self._countdown = index - n + 1
        return None if len(kept) == n else np.asarray(kept)

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("sampler already started")
        self._thread = threading.Thread(target=self._run, name="traffic-writer", daemon=True)
        self._thread.start()
        logger.info(
            "sampling %g of served inputs into %s (at most %d bytes per model and day, kept %d "
            "days)", self._rate, self._root, self._max_bytes_per_day, self._retention_days,
        )  # fmt: skip

    def stop(self, timeout_s: float) -> None:
        """Write what is queued and end the thread (waiting at most `timeout_s`)."""
        if self._thread is None:
            return
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            logger.warning("the traffic writer did not finish within %g s", timeout_s)

    def _run(self) -> None:
        tick_s = min(1.0, self._flush_s / 2)
        while True:
            self._wake.wait(tick_s)
            self._wake.clear()
            stopping = self._stopping.is_set()  # read first: nothing queued before is left
            try:
                self._step(final=stopping)
            except Exception:  # a bug here must not end the thread, nor print a traceback a turn
                self._warn("the traffic writer failed; samples may be lost", exc_info=True)
            if stopping:
                return

    def _step(self, *, final: bool) -> None:
        with self._lock:
            taken, self._queue, self._queued = self._queue, [], 0
        now = time.monotonic()
        for rows in taken:
            buffer = self._buffers.setdefault((rows.model, rows.version), _Buffer(now))
            buffer.rows.append(rows)
            buffer.samples += len(rows)
        for key, buffer in list(self._buffers.items()):
            if (
                final
                or buffer.samples >= self._shard_samples
                or now - buffer.first_at >= self._flush_s
            ):
                del self._buffers[key]
                self._write(buffer)
        for model in {model for model, _ in self._buffers} | set(self._usage):
            if now - self._pruned_at.get(model, -math.inf) >= PRUNE_EVERY_S:
                self._pruned_at[model] = now
                self._prune(model)

    def _write(self, buffer: _Buffer) -> None:
        first = buffer.rows[0]
        model, samples = first.model, buffer.samples
        shard = TrafficShard(
            model=model,
            version=first.version,
            inputs=np.concatenate([rows.inputs for rows in buffer.rows]),
            labels=np.concatenate([rows.labels for rows in buffer.rows]),
            scores=np.concatenate([rows.scores for rows in buffer.rows]),
            brittle=np.concatenate([rows.brittle for rows in buffer.rows]),
            times=np.concatenate([np.full(len(rows), rows.served_at) for rows in buffer.rows]),
        )
        size = shard.nbytes + SHARD_OVERHEAD_BYTES
        try:
            usage = self._day_usage(model, float(shard.times[0]))
            if usage.used_bytes + size > self._max_bytes_per_day:
                self._drop(model, "day_limit", samples)
                self._warn(
                    "traffic of %s: the day's budget of %d bytes in %s is spent; dropping samples "
                    "until the next UTC day", model, self._max_bytes_per_day, self._root,
                )  # fmt: skip
                return
            path = write_shard(self._root, shard, seq=self._seq, file_mode=self._file_mode)
            self._seq += 1
            usage.used_bytes += path.stat().st_size
        except OSError as error:
            self._drop(model, "write_error", samples)
            kind = "the disk is full" if error.errno in FULL_DISK else "cannot write"
            self._warn("traffic of %s: %s (%s); %d samples dropped", model, kind, error, samples)
            return
        self._metrics.observe_traffic_written(model, samples)

    def _day_usage(self, model: str, seconds: float) -> _DayUsage:
        """Bytes in the day folder of `seconds`: read from disk on a new day and every
        `RECOUNT_EVERY_S` (other replicas write there too), else this writer's count."""
        day = day_folder(self._root, model, seconds).name
        now = time.monotonic()
        usage = self._usage.get(model)
        if usage is None or usage.day != day or now - usage.counted_at >= RECOUNT_EVERY_S:
            usage = _DayUsage(day, day_bytes(self._root, model, seconds), now)
            self._usage[model] = usage
        return usage

    def _drop(self, model: str, reason: TrafficDropReason, samples: int) -> None:
        self._metrics.observe_traffic_dropped(model, reason, samples)

    def _prune(self, model: str) -> None:
        try:
            removed = prune(self._root, model, keep_days=self._retention_days, now=time.time())
        except OSError as error:
            self._warn("traffic of %s: cannot delete old day folders: %s", model, error)
            return
        if removed:
            logger.info("traffic of %s: deleted %d day folders older than %d days",
                        model, len(removed), self._retention_days)  # fmt: skip
