"""Every Prometheus object of the service, in one class with its own `CollectorRegistry` (one per
app instance, so tests and several apps in one process never collide), and `ServedTraffic`, the
collector that keeps per-request and per-batch metrics off the request path.

Label values come only from fixed sets: model names are the served ones (configuration and the
artifact store, never a request path), versions are, per model, the one CURRENT names and the
one serving, endpoints are route names, status classes are `2xx`…`5xx`. The request middleware
(`middleware.py`) and the registry's batch runner record into it; the live window it exports
lives in `live_window.py`; the registry's per-model state is read by `ModelStates` at scrape.
The traffic sampler (`traffic_sampler.py`) counts written and dropped samples here, and
`TrafficChecks` exports the latest `traffic-check.json` of each served version (the registry's
poll reads it).
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import groupby
from typing import Final, Literal, get_args

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Info,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from marginwatch.artifact.schema import CalibrationRecord, Curve
from marginwatch.artifact.traffic import TrafficCheck
from marginwatch.service.admission import Admission
from marginwatch.service.engine import Prediction, calibration_timestamp_s, iso_timestamp_s
from marginwatch.service.errors import ShedReason
from marginwatch.service.live_window import LiveWindow

LATENCY_BUCKETS_S = (
    0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
SCORE_BUCKETS = (-1.0, 0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST
TrafficDropReason = Literal["queue_full", "day_limit", "write_error"]
TRAFFIC_DROP_REASONS: Final[tuple[TrafficDropReason, ...]] = get_args(TrafficDropReason)


class _Buckets:
    """A histogram's state as numpy counts, filled many values at a time."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = np.asarray(bounds, dtype=np.float64)
        self._counts = np.zeros(len(bounds) + 1, dtype=np.int64)  # the last one is +Inf
        self._sum = 0.0
        self._labels = [floatToGoString(bound) for bound in bounds] + ["+Inf"]

    def add(self, values: np.ndarray) -> None:
        # Prometheus buckets are `le`: a value equal to a bound belongs to that bound's bucket
        slots = np.searchsorted(self._bounds, values, side="left")
        self._counts += np.bincount(slots, minlength=len(self._counts))
        self._sum += float(values.sum())

    def add_to(self, family: HistogramMetricFamily, labels: dict[str, str]) -> None:
        cumulative = np.cumsum(self._counts).tolist()
        buckets = list(zip(self._labels, cumulative, strict=True))
        family.add_metric(list(labels.values()), buckets, None)
        # added by hand: add_metric drops _count and _sum when a bound is negative (the score's)
        family.samples.append(Sample(f"{family.name}_count", labels, cumulative[-1]))
        family.samples.append(Sample(f"{family.name}_sum", labels, self._sum))


@dataclass(slots=True)
class _Batch:
    prediction: Prediction
    curve: Curve
    seconds: float


class _ModelTraffic:
    """One model's per-batch metrics: an inbox the hot path appends to, and folded totals."""

    def __init__(self, window_predictions: int, window_s: float) -> None:
        self.inbox: deque[_Batch] = deque()
        self.execution_seconds = _Buckets(LATENCY_BUCKETS_S)
        self.batch_size = _Buckets(BATCH_BUCKETS)
        self.scores = _Buckets(SCORE_BUCKETS)
        self.brittle = 0
        self.not_brittle = 0
        self.window = LiveWindow(window_predictions, window_s)

    def fold(self) -> None:
        """Move the inbox into the totals (the caller holds the lock)."""
        batches: list[_Batch] = []
        while self.inbox:
            batches.append(self.inbox.popleft())
        if not batches:
            return
        self.execution_seconds.add(np.array([batch.seconds for batch in batches]))
        self.batch_size.add(np.array([len(batch.prediction) for batch in batches]))
        scores = np.concatenate([batch.prediction.scores for batch in batches])
        self.scores.add(scores)
        brittle = int(sum(np.count_nonzero(batch.prediction.brittle) for batch in batches))
        self.brittle += brittle
        self.not_brittle += len(scores) - brittle
        start = 0
        # g is the curve of the version that served each batch; after a reload two curves mix
        for _, same_curve in groupby(batches, key=lambda batch: id(batch.curve)):
            run = list(same_curve)
            stop = start + sum(len(batch.prediction) for batch in run)
            self.window.add(run[0].curve(scores[start:stop]))
            start = stop


class _RequestTotals:
    """Requests by model, endpoint and status class, the shed ones among them by reason, and
    their durations by model and endpoint."""

    def __init__(self) -> None:
        self.inbox: deque[tuple[str, str, int, float, ShedReason | None]] = deque()
        self.counts: dict[tuple[str, str, str], int] = {}
        self.shed: dict[tuple[str, str, str], int] = {}
        self.durations: dict[tuple[str, str], _Buckets] = {}

    def fold(self) -> None:
        """Move the inbox into the totals (the caller holds the lock)."""
        seconds_by_route: dict[tuple[str, str], list[float]] = {}
        while self.inbox:
            model, endpoint, status, seconds, shed = self.inbox.popleft()
            key = (model, endpoint, f"{status // 100}xx")
            self.counts[key] = self.counts.get(key, 0) + 1
            if shed is not None:
                key = (model, endpoint, shed)
                self.shed[key] = self.shed.get(key, 0) + 1
            seconds_by_route.setdefault((model, endpoint), []).append(seconds)
        for route, durations in seconds_by_route.items():
            if route not in self.durations:
                self.durations[route] = _Buckets(LATENCY_BUCKETS_S)
            self.durations[route].add(np.array(durations))


class ServedTraffic(Collector):
    """The metrics that every request or batch touches, kept off the request path: recording
    one is a deque append; the counting (buckets, flags, the live window) happens in numpy when
    Prometheus scrapes, or once `FOLD_EVERY` records wait, whichever comes first."""

    FOLD_EVERY = 1024

    def __init__(self, window_predictions: int, window_s: float = math.inf) -> None:
        self._window_predictions = window_predictions
        self._window_s = window_s
        self._models: dict[str, _ModelTraffic] = {}
        self._requests = _RequestTotals()
        self._queues: dict[str, Callable[[], int]] = {}
        self._lock = threading.Lock()  # batches of one model may finish on different threads

    def record_request(
        self,
        model: str,
        endpoint: str,
        status: int,
        seconds: float,
        shed: ShedReason | None = None,
    ) -> None:
        self._requests.inbox.append((model, endpoint, status, seconds, shed))
        if len(self._requests.inbox) >= self.FOLD_EVERY:
            with self._lock:
                self._requests.fold()

    def record(self, model: str, curve: Curve, prediction: Prediction, seconds: float) -> None:
        traffic = self._models.get(model)
        if traffic is None:
            with self._lock:
                traffic = self._models.setdefault(
                    model, _ModelTraffic(self._window_predictions, self._window_s)
                )
        traffic.inbox.append(_Batch(prediction, curve, seconds))
        if len(traffic.inbox) >= self.FOLD_EVERY:
            with self._lock:
                traffic.fold()

    def pending(self) -> int:
        """Records not yet folded (the most any inbox holds)."""
        inboxes = [traffic.inbox for traffic in self._models.values()] + [self._requests.inbox]
        return max(len(inbox) for inbox in inboxes)

    def watch_queue(self, model: str, queued_samples: Callable[[], int]) -> None:
        self._queues[model] = queued_samples

    def forget(self, model: str) -> None:
        """Drop every series of `model` (it left the store)."""
        with self._lock:
            self._requests.fold()
            self._models.pop(model, None)
            self._queues.pop(model, None)
            counts, durations = self._requests.counts, self._requests.durations
            self._requests.counts = {key: n for key, n in counts.items() if key[0] != model}
            shed = self._requests.shed
            self._requests.shed = {key: n for key, n in shed.items() if key[0] != model}
            self._requests.durations = {key: b for key, b in durations.items() if key[0] != model}

    def collect(self) -> Iterator[Metric]:
        yield from self._collect_requests()
        yield from self._collect_batches()

    def _collect_requests(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "marginwatch_requests", "HTTP requests answered, by model, endpoint and status class",
            labels=["model", "endpoint", "status_class"],
        )  # fmt: skip
        shed = CounterMetricFamily(
            "marginwatch_requests_shed",
            "Inference requests refused with 503 because the server was at capacity, by reason "
            "(also counted in marginwatch_requests_total as 5xx): waiting_full, deadline, "
            "body_bytes, queue_full",
            labels=["model", "endpoint", "reason"],
        )  # fmt: skip
        durations = HistogramMetricFamily(
            "marginwatch_request_duration_seconds", "Time from request start to response end",
            labels=["model", "endpoint"],
        )  # fmt: skip
        with self._lock:
            self._requests.fold()
            for key, count in sorted(self._requests.counts.items()):
                requests.add_metric(list(key), count)
            for key, count in sorted(self._requests.shed.items()):
                shed.add_metric(list(key), count)
            for (model, endpoint), buckets in sorted(self._requests.durations.items()):
                buckets.add_to(durations, {"model": model, "endpoint": endpoint})
        yield from (requests, shed, durations)

    def _collect_batches(self) -> Iterator[Metric]:
        execution = HistogramMetricFamily(
            "marginwatch_model_execution_seconds", "ONNX Runtime time per batch, flags included",
            labels=["model"],
        )  # fmt: skip
        batch_size = HistogramMetricFamily(
            "marginwatch_batch_size", "Samples per model execution", labels=["model"]
        )
        predictions = CounterMetricFamily(
            "marginwatch_predictions", "Samples predicted, by whether the decision is brittle",
            labels=["model", "brittle"],
        )  # fmt: skip
        scores = HistogramMetricFamily(
            "marginwatch_score", "Brittleness score of served samples (brittle below λ)",
            labels=["model"],
        )  # fmt: skip
        live = GaugeMetricFamily(
            "marginwatch_live_robust_accuracy_ratio",
            "Mean of g(score) = P(correct and robust | score) over the recent served predictions",
            labels=["model"],
        )  # fmt: skip
        window = GaugeMetricFamily(
            "marginwatch_live_window_predictions",
            "Predictions in the live rolling window (the last N, none older than "
            "MARGINWATCH_LIVE_WINDOW_S): alerts on the live gauge need enough per replica",
            labels=["model"],
        )  # fmt: skip
        queued = GaugeMetricFamily(
            "marginwatch_queued_samples", "Samples waiting for a batch", labels=["model"]
        )
        with self._lock:
            for model, traffic in sorted(self._models.items()):
                traffic.fold()
                labels = {"model": model}
                traffic.execution_seconds.add_to(execution, labels)
                traffic.batch_size.add_to(batch_size, labels)
                traffic.scores.add_to(scores, labels)
                predictions.add_metric([model, "true"], traffic.brittle)
                predictions.add_metric([model, "false"], traffic.not_brittle)
                if len(traffic.window):
                    live.add_metric([model], traffic.window.mean())
                window.add_metric([model], len(traffic.window))
        for model, queued_samples in sorted(self._queues.items()):
            queued.add_metric([model], queued_samples())
        yield from (execution, batch_size, predictions, scores, live, window, queued)


def calibration_flagged_ratio(record: CalibrationRecord) -> float | None:
    """The brittle fraction a version's calibration saw, the baseline that served traffic's
    fraction is compared with (deploy/prometheus/rules.yml), or None where the record cannot
    tell.

    The record does not store the subset's flagged fraction. Under the `match-fraction` rule, λ
    flags as many subset points as are non-robust (ties round down), and a non-robust point is
    never counted in `subset_robust_accuracy` (correct *and* robust), so
    1 − subset_robust_accuracy is an upper bound of the flagged fraction: an alert that compares
    with it fires later than an exact baseline would, never earlier. Under `target-tpr` nothing
    in the record bounds it: None (and no series).
    """
    if record.threshold_rule.name == "match-fraction":
        return 1.0 - record.subset_robust_accuracy
    return None


@dataclass(frozen=True, slots=True)
class ModelState:
    """One model as the registry sees it: the version its CURRENT names (None: nothing
    published, or CURRENT unreadable) and the version answering requests (None: none)."""

    name: str
    desired: str | None
    served: str | None


class ModelStates(Collector):
    """Per-model readiness and versions, read from the registry at each scrape: nothing to keep
    in step, and a model the registry forgets leaves no series behind."""

    def __init__(self) -> None:
        self._states: Callable[[], Iterable[ModelState]] = tuple

    def watch(self, states: Callable[[], Iterable[ModelState]]) -> None:
        self._states = states

    def collect(self) -> Iterator[Metric]:
        ready = GaugeMetricFamily(
            "marginwatch_model_ready",
            "1 while the model has a verified version loaded and answers requests, else 0 "
            "(what /v2/models/{name}/ready says)", labels=["model"],
        )  # fmt: skip
        versions = GaugeMetricFamily(
            "marginwatch_model_version_info",
            "Always 1. state=desired: the version the model's CURRENT names (absent while CURRENT "
            "is missing or unreadable); state=served: the version answering requests. They "
            "differ while a version loads and after it was refused (see marginwatch_reloads_total)",
            labels=["model", "version", "state"],
        )  # fmt: skip
        for state in self._states():
            ready.add_metric([state.name], float(state.served is not None))
            for kind, version in (("desired", state.desired), ("served", state.served)):
                if version is not None:
                    versions.add_metric([state.name, version, kind], 1.0)
        yield from (ready, versions)


class TrafficChecks(Collector):
    """The latest traffic check (`traffic-check.json`, `artifact/traffic.py`) of each model's
    served version, exported as it is: ratios with their 95 % interval as `bound` =
    estimate | low | high, recall and precision where the check could compute them, the points
    behind them, and when it ran. A model without a valid check for its served version has none
    of these series."""

    def __init__(self) -> None:
        self._checks: dict[str, TrafficCheck] = {}

    def show(self, model: str, check: TrafficCheck | None) -> None:
        if check is None:
            self._checks.pop(model, None)
        else:
            self._checks[model] = check

    def collect(self) -> Iterator[Metric]:
        def family(name: str, text: str, *extra: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(
                f"marginwatch_traffic_check_{name}", text, labels=["model", "version", *extra]
            )

        nonrobust = family(
            "nonrobust_ratio", "Share of checked traffic whose served label an attack flips "
            "within eps (label-free non-robustness), with its 95 % interval", "bound",
        )  # fmt: skip
        flagged = family(
            "flagged_ratio", "Share of checked traffic the served flag marked brittle, with its "
            "95 % interval", "bound",
        )  # fmt: skip
        recall = family("recall", "Share of the non-robust checked points that were flagged")
        precision = family("precision", "Share of the flagged checked points that are non-robust")
        points = family(
            "points", "Points behind the check: checked, non-robust and flagged ones", "kind"
        )
        timestamp = family("timestamp_seconds", "When the check ran (Unix time)")
        for model, check in sorted(self._checks.items()):
            labels = [model, check.version]
            for ratios, ratio in ((nonrobust, check.nonrobust), (flagged, check.flagged)):
                for bound, value in (("estimate", ratio.value), ("low", ratio.ci_low),
                                     ("high", ratio.ci_high)):  # fmt: skip
                    ratios.add_metric([*labels, bound], value)
            for kind, count in (("checked", check.nonrobust.total),
                                ("nonrobust", check.nonrobust.count),
                                ("flagged", check.flagged.count)):  # fmt: skip
                points.add_metric([*labels, kind], count)
            if check.recall is not None:
                recall.add_metric(labels, check.recall)
            if check.precision is not None:
                precision.add_metric(labels, check.precision)
            timestamp.add_metric(labels, iso_timestamp_s(check.created_at))
        yield from (nonrobust, flagged, recall, precision, points, timestamp)


class AdmissionState(Collector):
    """The admission budgets (`admission.py`), read at scrape: what is held and waiting against
    the limits, so that a dashboard shows how close to shedding a replica runs."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission

    def collect(self) -> Iterator[Metric]:
        admission = self._admission
        requests = GaugeMetricFamily(
            "marginwatch_admission_requests",
            "Inference requests holding a place (in_progress) or waiting for one (waiting)",
            labels=["state"],
        )  # fmt: skip
        requests.add_metric(["in_progress"], admission.requests)
        requests.add_metric(["waiting"], admission.waiting)
        body_bytes = GaugeMetricFamily(
            "marginwatch_admission_body_bytes", "Request body bytes reserved by requests in flight"
        )
        body_bytes.add_metric([], admission.body_bytes)
        limits = GaugeMetricFamily(
            "marginwatch_admission_limit",
            "Admission limits: requests (MARGINWATCH_MAX_INFLIGHT_REQUESTS), waiting "
            "(MARGINWATCH_MAX_WAITING_REQUESTS), body_bytes (MARGINWATCH_MAX_INFLIGHT_BODY_BYTES)",
            labels=["budget"],
        )  # fmt: skip
        limits.add_metric(["requests"], admission.max_requests)
        limits.add_metric(["waiting"], admission.max_waiting)
        limits.add_metric(["body_bytes"], admission.max_body_bytes)
        service = GaugeMetricFamily(
            "marginwatch_admission_service_seconds",
            "Moving average of the time requests hold a place; a waiting request gives up once "
            "less than this is left before its deadline",
        )  # fmt: skip
        service.add_metric([], admission.service_s)
        yield from (requests, body_bytes, limits, service)


class ServiceMetrics:
    """The service's metrics; `observe_*` methods are called at stage boundaries."""

    def __init__(
        self,
        live_window_predictions: int,
        live_window_s: float = 600.0,
        traffic_sample_rate: float = 0.0,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.traffic = ServedTraffic(live_window_predictions, live_window_s)
        r.register(self.traffic)
        self.models = ModelStates()
        r.register(self.models)
        self.traffic_checks = TrafficChecks()
        r.register(self.traffic_checks)
        self._sampling = traffic_sample_rate > 0
        Gauge(
            "marginwatch_traffic_sample_ratio",
            "Fraction of served inputs sampled to the traffic folder for the calibration job's "
            "check of the flag (MARGINWATCH_TRAFFIC_SAMPLE_RATE; 0: off)", registry=r,
        ).set(traffic_sample_rate)  # fmt: skip
        self.store_available = Gauge(
            "marginwatch_store_available",
            "1 while the last poll listed the artifact store; 0 while it was missing, unreadable "
            "or empty although models are served (an unmounted or remounted volume): loaded "
            "versions keep serving, but no new version can be picked up", registry=r,
        )  # fmt: skip
        self.store_available.set(1)
        self.traffic_samples_written = Counter(
            "marginwatch_traffic_samples_written", "Sampled inputs written to the traffic folder",
            ["model"], registry=r,
        )  # fmt: skip
        self.traffic_samples_dropped = Counter(
            "marginwatch_traffic_samples_dropped",
            "Sampled inputs not written: queue_full (the writer fell behind), day_limit (the "
            "day's byte budget is spent), write_error (the folder is full, read-only or gone)",
            ["model", "reason"], registry=r,
        )  # fmt: skip
        self.traffic_check_errors = Counter(
            "marginwatch_traffic_check_errors",
            "traffic-check.json files of a served version that could not be read or are not a "
            "valid check of it (ignored: that version shows no check)", ["model"], registry=r,
        )  # fmt: skip
        self.calibration_robust_accuracy = Gauge(
            "marginwatch_calibration_robust_accuracy_ratio",
            "Robust accuracy estimated by the calibration job, on its evaluation set",
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
        self.calibration_flagged = Gauge(
            "marginwatch_calibration_flagged_ratio",
            "Brittle fraction the calibration expects on data like its own: the share of its "
            "attacked subset flagged at the served λ (see calibration_flagged_ratio)",
            ["model"], registry=r,
        )  # fmt: skip
        self.reloads = Counter(
            "marginwatch_reloads", "Attempts to load a calibration version, by result",
            ["model", "result"], registry=r,
        )  # fmt: skip
        self.client_disconnects = Counter(
            "marginwatch_client_disconnects",
            "Requests whose client closed the connection before sending the whole body (their "
            "status is 499: not server errors)", registry=r,
        )  # fmt: skip

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def watch_admission(self, admission: Admission) -> None:
        """Export `admission`'s budgets (read at each scrape)."""
        self.registry.register(AdmissionState(admission))

    def observe_version(self, model: str, record: CalibrationRecord) -> None:
        """A version was loaded and now serves `model`."""
        self.reloads.labels(model, "success").inc()
        self.calibration_robust_accuracy.labels(model).set(record.robust_accuracy.estimate)
        self.calibration_timestamp.labels(model).set(calibration_timestamp_s(record))
        flagged = calibration_flagged_ratio(record)
        if flagged is None:  # a version that states none must not leave the previous one's
            self.calibration_flagged.remove(model)
        else:
            self.calibration_flagged.labels(model).set(flagged)
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

    def track(self, model: str) -> None:
        """`model` is known from now on: its reload counters exist at 0, so that `increase()`
        sees its first failure (a series that appears at 1 has no increase)."""
        for result in ("success", "failure"):
            self.reloads.labels(model, result)
        self.traffic_check_errors.labels(model)
        if self._sampling:
            self.traffic_samples_written.labels(model)
            for reason in TRAFFIC_DROP_REASONS:
                self.traffic_samples_dropped.labels(model, reason)

    def forget(self, model: str) -> None:
        """`model` left the store: drop its series, so that no dashboard shows it as present."""
        for metric in (
            self.calibration_robust_accuracy, self.calibration_timestamp, self.calibration_info,
            self.calibration_flagged,
        ):  # fmt: skip
            metric.remove(model)
        for result in ("success", "failure"):
            self.reloads.remove(model, result)
        self.traffic.forget(model)
        self.traffic_checks.show(model, None)
        self.traffic_check_errors.remove(model)
        self.traffic_samples_written.remove(model)
        for reason in TRAFFIC_DROP_REASONS:
            self.traffic_samples_dropped.remove(model, reason)

    def observe_batch(
        self, model: str, record: CalibrationRecord, prediction: Prediction, seconds: float
    ) -> None:
        """One model execution: its latency, size, flags, scores and the live estimate."""
        self.traffic.record(model, record.live_curve, prediction, seconds)

    def observe_traffic_written(self, model: str, samples: int) -> None:
        self.traffic_samples_written.labels(model).inc(samples)

    def observe_traffic_dropped(self, model: str, reason: TrafficDropReason, samples: int) -> None:
        self.traffic_samples_dropped.labels(model, reason).inc(samples)

    def observe_traffic_check(self, model: str, check: TrafficCheck | None) -> None:
        """The served version's traffic check (None: it has none, or no valid one)."""
        self.traffic_checks.show(model, check)

    def observe_traffic_check_error(self, model: str) -> None:
        self.traffic_check_errors.labels(model).inc()

    def observe_request(
        self,
        model: str,
        endpoint: str,
        status: int,
        seconds: float,
        shed: ShedReason | None = None,
    ) -> None:
        """One answered request; `shed`: why it was refused for capacity, if it was."""
        self.traffic.record_request(model, endpoint, status, seconds, shed)

    def observe_disconnect(self) -> None:
        self.client_disconnects.inc()
