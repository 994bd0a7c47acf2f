"""Served models by name, and hot reload.

Each loaded version is a `Deployment`: a `ServedModel` and its own `MicroBatcher`. A request looks
its deployment up and submits to it without awaiting in between, so it finishes on the version it
started with. The watcher polls every model's CURRENT pointer; a new version is loaded and
verified beside the old one (in a thread, so serving goes on), then swapped in with one dict
assignment; the old deployment's batcher serves what it has queued and stops. A version that fails
verification is refused with a log line and a `marginwatch_reloads_total{result="failure"}`
increment, and the old one keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import numpy as np

from marginwatch.artifact.store import ArtifactError, current_version, list_models
from marginwatch.service.batcher import MicroBatcher, RunBatch
from marginwatch.service.engine import EngineOptions, Prediction, ServedModel
from marginwatch.service.errors import ModelNotFound, ModelNotReady
from marginwatch.service.metrics import ServiceMetrics
from marginwatch.service.settings import Settings

logger = logging.getLogger("marginwatch.service")


@dataclass(frozen=True)
class Deployment:
    """One loaded version and the batcher in front of its session."""

    model: ServedModel
    batcher: MicroBatcher

    def infer(self, x: np.ndarray) -> Coroutine[Any, Any, Prediction]:
        return self.batcher.submit(x)  # the batcher's own coroutine: no extra frame (fastpath.py)


class ModelRegistry:
    """The models this process serves; `start()` loads them, `stop()` drains them."""

    def __init__(self, settings: Settings, metrics: ServiceMetrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._options = EngineOptions(
            device=settings.device,
            intra_op_threads=settings.intra_op_threads,
            inter_op_threads=settings.inter_op_threads,
        )
        self._names: set[str] = set(settings.models)
        self._serving: dict[str, Deployment] = {}
        self._refused: dict[str, str] = {}
        self._watcher: asyncio.Task[None] | None = None
        self._retiring: set[asyncio.Task[None]] = set()

    def known(self, name: str) -> bool:
        return name in self._names

    def names(self) -> list[str]:
        return sorted(self._names)

    def ready(self) -> bool:
        """Every served model has a verified version loaded (and there is at least one)."""
        return bool(self._names) and all(name in self._serving for name in self._names)

    def get(self, name: str) -> Deployment:
        deployment = self._serving.get(name)
        if deployment is not None:
            return deployment
        if name not in self._names:
            raise ModelNotFound(f"no model named {name!r}; served models: {self.names()}")
        raise ModelNotReady(f"model {name!r} has no verified calibration version loaded")

    async def start(self) -> None:
        await self.refresh()
        if self._settings.reload_interval_s > 0:
            self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="reload")

    async def stop(self) -> None:
        """Stop watching, then let every batcher serve what it has queued."""
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        deployments = list(self._serving.values())
        self._serving.clear()
        await asyncio.gather(*(d.batcher.close() for d in deployments), *self._retiring)

    async def refresh(self) -> None:
        """Load every model whose CURRENT names a version not yet served nor refused."""
        if not self._settings.models:
            self._names.update(list_models(self._settings.store))
        for name in sorted(self._names):
            await self._refresh_one(name)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._settings.reload_interval_s)
            try:
                await self.refresh()
            except Exception:  # a broken poll must not end the watcher
                logger.exception("polling the artifact store failed")

    async def _refresh_one(self, name: str) -> None:
        version = current_version(self._settings.store, name)
        old = self._serving.get(name)
        if version is None or self._refused.get(name) == version:
            return
        if old is not None and old.model.version == version:
            return
        model = ServedModel(name, self._settings.store / name / version, self._options)
        try:
            await asyncio.to_thread(model.load)
        except ArtifactError as error:
            self._refused[name] = version
            self._metrics.observe_refusal(name)
            serving = old.model.version if old else "none"
            logger.error(
                "refused %s version %s (still serving %s): %s", name, version, serving, error
            )
            return
        deployment = self._deploy(model)
        self._serving[name] = deployment
        self._metrics.observe_version(name, model.record)
        logger.info(
            "serving %s version %s (was %s)", name, version, old.model.version if old else "none"
        )
        if old is not None:
            task = asyncio.get_running_loop().create_task(old.batcher.close())
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    def _deploy(self, model: ServedModel) -> Deployment:
        batcher = MicroBatcher(
            self._runner(model),
            max_batch_size=self._settings.max_batch_size,
            max_wait_s=self._settings.max_batch_wait_s,
            max_queue_samples=self._settings.max_queue_samples,
            inline_max_samples=self._settings.inline_max_samples,
            name=model.name,
        )
        batcher.start()
        self._metrics.traffic.watch_queue(model.name, lambda: batcher.queued_samples)
        return Deployment(model, batcher)

    def _runner(self, model: ServedModel) -> RunBatch:
        metrics = self._metrics
        record = model.record

        def run(x: np.ndarray) -> Prediction:
            started = time.perf_counter()
            prediction = model.predict(x)
            metrics.observe_batch(model.name, record, prediction, time.perf_counter() - started)
            return prediction

        return run
