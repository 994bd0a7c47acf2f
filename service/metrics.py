"""Every Prometheus object of the service, in one class with its own `CollectorRegistry` (one per
app instance, so tests and several apps in one process never collide).

Label values come only from fixed sets: model names are the served ones (configuration and the
artifact store, never a request path), endpoints are route names, status classes are `2xx`…`5xx`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

from calibration.artifact import CalibrationRecord
from service.engine import Prediction, calibration_timestamp_s

UNKNOWN_MODEL = "_unknown"
OTHER_ENDPOINT = "other"
LATENCY_BUCKETS_S = (
    0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
SCORE_BUCKETS = (-1.0, 0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class LiveWindow:
    """The mean of g(score) over the last `size` served predictions (a ring buffer)."""

    def __init__(self, size: int) -> None:
        self._values = np.zeros(size, dtype=np.float64)
        self._next = 0
        self._count = 0
        self._sum = 0.0
        self._lock = threading.Lock()

    def add(self, values: np.ndarray) -> float:
        """Append `values` (the newest last) and return the window's mean."""
        size = len(self._values)
        values = np.asarray(values, dtype=np.float64)[-size:]
        with self._lock:
            positions = (self._next + np.arange(len(values))) % size
            # a running sum keeps this O(batch), not O(window), on the hot path; it is rebuilt
            # at each wrap-around so float error cannot accumulate
            self._sum += float(values.sum()) - float(self._values[positions].sum())
            self._values[positions] = values
            self._next = (self._next + len(values)) % size
            self._count = min(self._count + len(values), size)
            if self._next < len(values):
                self._sum = float(self._values[: self._count].sum())
            return self._sum / self._count

    def __len__(self) -> int:
        return self._count


@dataclass(frozen=True)
class _BatchSeries:
    """One model's labelled children of the per-batch metrics."""

    execution_seconds: Any
    batch_size: Any
    brittle: Any
    not_brittle: Any
    scores: Any
    live_robust_accuracy: Any
    live_window: Any
    window: LiveWindow


class ServiceMetrics:
    """The service's metrics; `observe_*` methods are called at stage boundaries."""

    def __init__(self, live_window_predictions: int) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "marginwatch_requests", "HTTP requests answered, by model, endpoint and status class",
            ["model", "endpoint", "status_class"], registry=r,
        )  # fmt: skip
        self.request_seconds = Histogram(
            "marginwatch_request_duration_seconds", "Time from request start to response end",
            ["model", "endpoint"], buckets=LATENCY_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.execution_seconds = Histogram(
            "marginwatch_model_execution_seconds", "ONNX Runtime time per batch, flags included",
            ["model"], buckets=LATENCY_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "marginwatch_batch_size", "Samples per model execution",
            ["model"], buckets=BATCH_BUCKETS, registry=r,
        )  # fmt: skip
        self.predictions = Counter(
            "marginwatch_predictions", "Samples predicted, by whether the decision is brittle",
            ["model", "brittle"], registry=r,
        )  # fmt: skip
        self.scores = Histogram(
            "marginwatch_score", "Brittleness score of served samples (brittle below λ)",
            ["model"], buckets=SCORE_BUCKETS, registry=r,
        )  # fmt: skip
        self.calibration_robust_accuracy = Gauge(
            "marginwatch_calibration_robust_accuracy_ratio",
            "Robust accuracy estimated by the calibration job, on its evaluation set",
            ["model"], registry=r,
        )  # fmt: skip
        self.live_robust_accuracy = Gauge(
            "marginwatch_live_robust_accuracy_ratio",
            "Mean of g(score) = P(correct and robust | score) over the recent served predictions",
            ["model"], registry=r,
        )  # fmt: skip
        self.live_window = Gauge(
            "marginwatch_live_window_predictions", "Predictions in the live rolling window",
            ["model"], registry=r,
        )  # fmt: skip
        self.calibration_timestamp = Gauge(
            "marginwatch_calibration_timestamp_seconds",
            "When the served calibration version was created (Unix time)",
            ["model"], registry=r,
        )  # fmt: skip
        self.calibration_info = Info(
            "marginwatch_calibration", "The served calibration version", ["model"], registry=r
        )
        self.reloads = Counter(
            "marginwatch_reloads", "Attempts to load a calibration version, by result",
            ["model", "result"], registry=r,
        )  # fmt: skip
        self.queued = Gauge(
            "marginwatch_queued_samples", "Samples waiting for a batch", ["model"], registry=r
        )
        self._window_size = live_window_predictions
        self._series_lock = threading.Lock()
        # labels() costs microseconds per call: resolve each series once, not per request
        self._batch_series: dict[str, _BatchSeries] = {}
        self._request_series: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def observe_version(self, model: str, record: CalibrationRecord) -> None:
        """A version was loaded and now serves `model`."""
        self.reloads.labels(model, "success").inc()
        self.calibration_robust_accuracy.labels(model).set(record.robust_accuracy.estimate)
        self.calibration_timestamp.labels(model).set(calibration_timestamp_s(record))
        self.calibration_info.labels(model).info(
            {
                "version": record.version,
                "score_kind": record.score_kind,
                "threshold": repr(record.threshold),
                "guard_band": repr(record.guard_band),
                "model_sha256": record.model_sha256,
            }
        )

    def observe_refusal(self, model: str) -> None:
        self.reloads.labels(model, "failure").inc()

    def observe_batch(
        self, model: str, record: CalibrationRecord, prediction: Prediction, seconds: float
    ) -> None:
        """One model execution: its latency, size, flags, scores and the live estimate."""
        series = self._batch_series.get(model) or self._new_batch_series(model)
        series.execution_seconds.observe(seconds)
        series.batch_size.observe(len(prediction))
        brittle = int(prediction.brittle.sum())
        series.brittle.inc(brittle)
        series.not_brittle.inc(len(prediction) - brittle)
        for score in prediction.scores.tolist():
            series.scores.observe(score)
        series.live_robust_accuracy.set(series.window.add(record.live_curve(prediction.scores)))
        series.live_window.set(len(series.window))

    def _new_batch_series(self, model: str) -> _BatchSeries:
        with self._series_lock:  # batches of one model may finish on different threads
            if model in self._batch_series:
                return self._batch_series[model]
            series = self._create_batch_series(model)
            self._batch_series[model] = series
            return series

    def _create_batch_series(self, model: str) -> _BatchSeries:
        return _BatchSeries(
            execution_seconds=self.execution_seconds.labels(model),
            batch_size=self.batch_size.labels(model),
            brittle=self.predictions.labels(model, "true"),
            not_brittle=self.predictions.labels(model, "false"),
            scores=self.scores.labels(model),
            live_robust_accuracy=self.live_robust_accuracy.labels(model),
            live_window=self.live_window.labels(model),
            window=LiveWindow(self._window_size),
        )

    def observe_request(self, model: str, endpoint: str, status: int, seconds: float) -> None:
        key = (model, endpoint, status // 100)
        series = self._request_series.get(key)
        if series is None:
            series = (
                self.requests.labels(model, endpoint, f"{status // 100}xx"),
                self.request_seconds.labels(model, endpoint),
            )
            self._request_series[key] = series
        series[0].inc()
        series[1].observe(seconds)


class RequestMetricsMiddleware:
    """Pure ASGI middleware: counts and times every HTTP request after routing has named it."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, known: Callable[[str], bool]) -> None:
        self.app = app
        self.metrics = metrics
        self.known = known

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            self._record(scope, status, time.perf_counter() - started)

    def _record(self, scope: Scope, status: int, seconds: float) -> None:
        route = scope.get("route")
        endpoint = getattr(route, "name", None) or OTHER_ENDPOINT
        name = scope.get("path_params", {}).get("name")
        model = name if isinstance(name, str) and self.known(name) else UNKNOWN_MODEL
        if name is None:
            model = ""
        self.metrics.observe_request(model, endpoint, status, seconds)
