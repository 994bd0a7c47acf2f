"""One loaded version as it serves: a `Deployment` is a `ServedModel` and the `MicroBatcher` in
front of its session (`deploy` builds and starts it), and `batch_runner` is what that batcher
runs: the model, then the batch's metrics, then the traffic sampler's offer. The registry
(`registry.py`) decides which deployment serves a name; a request looks its deployment up there
and submits to it without awaiting in between, so it finishes on the version it started with.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import numpy as np

from marginwatch.service.batcher import MicroBatcher, RunBatch
from marginwatch.service.engine import Prediction, ServedModel
from marginwatch.service.metrics import ServiceMetrics
from marginwatch.service.settings import Settings
from marginwatch.service.traffic_sampler import TrafficSampler


@dataclass(frozen=True)
class Deployment:
    """One loaded version and the batcher in front of its session."""

    model: ServedModel
    batcher: MicroBatcher

    def infer(
        self, x: np.ndarray, deadline: float | None = None, *, company: int = 0
    ) -> Coroutine[Any, Any, Prediction]:
        """The batcher's own coroutine (no extra frame or task per request); `company`: how
        many calls of its transport are in progress with it (gRPC's, see `grpc_servicer.py`)."""
        return self.batcher.submit(x, deadline, company=company)


def deploy(
    model: ServedModel,
    settings: Settings,
    metrics: ServiceMetrics,
    sampler: TrafficSampler | None,
    backlog: Callable[[], bool],
) -> Deployment:
    """`model` behind a started batcher of its own; its queue is watched by the metrics.
    `backlog`: whether requests wait for admission (the batcher's hint, see `batcher.py`)."""
    batcher = MicroBatcher(
        batch_runner(model, metrics, sampler),
        max_batch_size=settings.max_batch_size,
        max_wait_s=settings.max_batch_wait_s,
        max_queue_samples=settings.max_queue_samples,
        inline_max_samples=settings.inline_max_samples,
        backlog=backlog,
        name=model.name,
    )
    batcher.start()
    metrics.traffic.watch_queue(model.name, lambda: batcher.queued_samples)
    return Deployment(model, batcher)


def batch_runner(
    model: ServedModel, metrics: ServiceMetrics, sampler: TrafficSampler | None
) -> RunBatch:
    """What a batcher runs: the model, then the batch's metrics, then the sampler's offer (the
    benchmark of sampling, bench/traffic_sampling.py, times this very function)."""
    record = model.record
    name, version = model.name, model.version

    def run(x: np.ndarray) -> Prediction:
        started = time.perf_counter()
        prediction = model.predict(x)
        metrics.observe_batch(name, record, prediction, time.perf_counter() - started)
        if sampler is not None:
            sampler.offer(name, version, x, prediction)
        return prediction

    return run
