"""`ServedTraffic`, the collector of the metrics that every request or batch touches: request
counts, shed requests and durations by model and endpoint; per model the execution time, batch
size, scores, predictions by predicted class and flag, one live window (`live_window.py`) per
budget of the served version's grid, and the queued samples.

Recording is the request path's cost, so it is kept small: a request is one dict update and one
list append; a batch's scores, labels and flags are copied into its model's inbox arrays, so no
batch's own arrays are kept alive. The bucketing, the counts by class and the live windows are
done in numpy when Prometheus scrapes, or once `FOLD_EVERY` requests or samples wait: 22 µs → 4
µs per batch in the server against Prometheus objects observed on the request path, and no
`Histogram.observe` per sample at batch 64 (docs/benchmarks.md, "How it got here"). An inbox
that held each batch's whole `Prediction` and counted them batch by batch took 2.5 ms every 1,024
one-image requests, and left the p99 latency at concurrency 1 at 2-3× the minimal endpoint's;
now 0.3 ms (docs/benchmarks.md, "The concurrency-1 tail: the metrics inbox").
The request middleware (`middleware.py`, through `ServiceMetrics.observe_request`) and the batch
runner (`deployment.py`, through `ServiceMetrics.observe_batch`) record into it.

The `eps`, `served` and `class` label values come from the version that served each batch
(`version_labels.py`).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator

import numpy as np
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from marginwatch.artifact.schema import CalibrationRecord
from marginwatch.service.engine import Prediction
from marginwatch.service.errors import ShedReason
from marginwatch.service.live_window import LiveWindow
from marginwatch.service.settings import DEFAULT_CLASS_LABELS
from marginwatch.service.version_labels import ServedVersion

LATENCY_BUCKETS_S = (
    0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
SCORE_BUCKETS = (-1.0, 0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0)


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


class _Inbox:
    """The batches not yet counted, as the hot path leaves them: each batch's time and size in
    lists, each sample's score, label and flag copied into arrays of `capacity` samples (a batch
    keeps none of its own arrays alive), all served by one version (`record`)."""

    def __init__(self, capacity: int) -> None:
        self.scores = np.empty(capacity, dtype=np.float64)
        self.labels = np.empty(capacity, dtype=np.int64)
        self.brittle = np.empty(capacity, dtype=np.bool_)
        self.seconds: list[float] = []
        self.sizes: list[int] = []
        self.samples = 0
        self.record: CalibrationRecord | None = None

    def room_for(self, record: CalibrationRecord, size: int) -> bool:
        """Whether a batch of `size` samples that `record`'s version served can join."""
        same = self.record is None or self.record is record  # versions are told apart by `is`
        return same and self.samples + size <= len(self.scores)

    def add(self, record: CalibrationRecord, prediction: Prediction, seconds: float) -> None:
        start, stop = self.samples, self.samples + len(prediction)
        self.scores[start:stop] = prediction.scores
        self.labels[start:stop] = prediction.labels
        self.brittle[start:stop] = prediction.brittle
        self.samples = stop
        self.seconds.append(seconds)
        self.sizes.append(stop - start)
        self.record = record

    def clear(self) -> None:
        self.seconds, self.sizes, self.samples, self.record = [], [], 0, None


class _ModelTraffic:
    """One model's per-batch metrics: an inbox the hot path copies into, and folded totals."""

    def __init__(
        self, window_predictions: int, window_s: float, class_labels: int, inbox_samples: int
    ) -> None:
        self.inbox = _Inbox(inbox_samples)
        self.execution_seconds = _Buckets(LATENCY_BUCKETS_S)
        self.batch_size = _Buckets(BATCH_BUCKETS)
        self.scores = _Buckets(SCORE_BUCKETS)
        self.predictions: dict[str, list[int]] = {}  # class value -> [brittle, not brittle]
        self.windows: dict[str, LiveWindow] = {}  # eps value -> window: the serving version's
        self.versions: list[ServedVersion] = []  # the serving version last, the one before it
        self._window = (window_predictions, window_s)
        self._class_labels = class_labels

    def add(self, record: CalibrationRecord, prediction: Prediction, seconds: float) -> None:
        """One batch (the caller holds the lock): into the inbox, which is counted first when
        it is full or holds another version's batches; a batch larger than the whole inbox is
        counted at once."""
        inbox = self.inbox
        if not inbox.room_for(record, len(prediction)):
            self.fold()
            if not inbox.room_for(record, len(prediction)):
                self._count(
                    self._version_of(record),
                    seconds=np.array([seconds]),
                    sizes=np.array([len(prediction)]),
                    scores=prediction.scores,
                    labels=prediction.labels,
                    brittle=prediction.brittle,
                )
                return
        inbox.add(record, prediction, seconds)

    def serve(self, record: CalibrationRecord) -> ServedVersion:
        """`record`'s version serves from now on: the windows follow its grid (a budget it
        shares with the last keeps its window), its classes' counters exist from now on."""
        version = ServedVersion.of(record, self._class_labels)
        self.versions = [*self.versions[-1:], version]
        windows = self.windows
        self.windows = {
            eps: windows[eps] if eps in windows else LiveWindow(*self._window)
            for eps in version.eps
        }
        for name in version.classes:
            self.predictions.setdefault(name, [0, 0])
        return version

    def live(self) -> Iterator[tuple[str, str, float]]:
        """(eps, served, mean) of each window that holds predictions, in the grid's order."""
        for eps, served, _ in self.versions[-1].budget_labels() if self.versions else ():
            if len(self.windows[eps]):
                yield eps, served, self.windows[eps].mean()

    def served_window_size(self) -> int:
        if not self.versions:
            return 0
        version = self.versions[-1]
        return len(self.windows[version.eps[version.served]])

    def fold(self) -> None:
        """Move the inbox into the totals (the caller holds the lock)."""
        inbox = self.inbox
        if inbox.record is None:
            return
        n = inbox.samples
        self._count(
            self._version_of(inbox.record),
            seconds=np.array(inbox.seconds),
            sizes=np.array(inbox.sizes),
            scores=inbox.scores[:n],
            labels=inbox.labels[:n],
            brittle=inbox.brittle[:n],
        )
        inbox.clear()

    def _version_of(self, record: CalibrationRecord) -> ServedVersion:
        for version in reversed(self.versions):
            if version.record is record:
                return version
        if not self.versions:  # batches before any version was served: tests, benchmarks
            return self.serve(record)
        return ServedVersion.of(record, self._class_labels)  # older still: rare, not kept

    def _count(
        self,
        version: ServedVersion,
        *,
        seconds: np.ndarray,
        sizes: np.ndarray,
        scores: np.ndarray,
        labels: np.ndarray,
        brittle: np.ndarray,
    ) -> None:
        """Batches that `version` served, into the totals and its budgets' live windows."""
        self.execution_seconds.add(seconds)
        self.batch_size.add(sizes)
        self.scores.add(scores)
        slots = version.class_slots[labels]
        every = np.bincount(slots, minlength=len(version.classes)).tolist()
        flagged = np.bincount(slots[brittle], minlength=len(version.classes)).tolist()
        for name, total, count in zip(version.classes, every, flagged, strict=True):
            counts = self.predictions.setdefault(name, [0, 0])
            counts[0] += count
            counts[1] += total - count
        for eps, _, budget in version.budget_labels():
            window = self.windows.get(eps)
            if window is not None:  # else a budget the serving version's grid does not have
                window.add(budget.live_curve(scores))


class _RequestTotals:
    """Requests by model, endpoint and status class, the shed ones among them by reason, and
    their durations by model and endpoint (counted at once; the durations wait in lists, as
    `waiting` of them, to be bucketed in numpy by `fold`)."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str, str], int] = {}
        self.shed: dict[tuple[str, str, str], int] = {}
        self.durations: dict[tuple[str, str], _Buckets] = {}
        self.unbucketed: dict[tuple[str, str], list[float]] = {}
        self.waiting = 0

    def add(
        self, model: str, endpoint: str, status: int, seconds: float, shed: ShedReason | None
    ) -> None:
        """One answered request (the caller holds the lock)."""
        key = (model, endpoint, f"{status // 100}xx")
        self.counts[key] = self.counts.get(key, 0) + 1
        if shed is not None:
            key = (model, endpoint, shed)
            self.shed[key] = self.shed.get(key, 0) + 1
        route = (model, endpoint)
        durations = self.unbucketed.get(route)
        if durations is None:
            durations = self.unbucketed[route] = []
        durations.append(seconds)
        self.waiting += 1

    def fold(self) -> None:
        """Bucket the waiting durations (the caller holds the lock)."""
        for route, durations in self.unbucketed.items():
            if route not in self.durations:
                self.durations[route] = _Buckets(LATENCY_BUCKETS_S)
            self.durations[route].add(np.array(durations))
        self.unbucketed = {}
        self.waiting = 0


class ServedTraffic(Collector):
    """The metrics that every request or batch touches, kept off the request path: recording
    one is a few list and array writes; the counting (buckets, flags, the live windows) happens
    in numpy when Prometheus scrapes, or once `FOLD_EVERY` requests or samples wait, whichever
    comes first."""

    FOLD_EVERY = 1024

    def __init__(
        self,
        window_predictions: int,
        window_s: float = math.inf,
        class_labels: int = DEFAULT_CLASS_LABELS,
    ) -> None:
        self._window_predictions = window_predictions
        self._window_s = window_s
        self._class_labels = class_labels
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
        with self._lock:
            self._requests.add(model, endpoint, status, seconds, shed)
            if self._requests.waiting >= self.FOLD_EVERY:
                self._requests.fold()

    def record(
        self, model: str, record: CalibrationRecord, prediction: Prediction, seconds: float
    ) -> None:
        """A batch that `record`'s version served (its flags at the served budget)."""
        traffic = self._models.get(model)
        with self._lock:
            if traffic is None:
                traffic = self._models.setdefault(model, self._new_model())
            traffic.add(record, prediction, seconds)

    def serve(self, model: str, record: CalibrationRecord) -> ServedVersion:
        """`record`'s version serves `model` from now on (not the request path: a load)."""
        with self._lock:
            traffic = self._models.setdefault(model, self._new_model())
            traffic.fold()  # the batches before it are labelled while their version is known
            return traffic.serve(record)

    def _new_model(self) -> _ModelTraffic:
        return _ModelTraffic(
            self._window_predictions, self._window_s, self._class_labels, self.FOLD_EVERY
        )

    def pending(self) -> int:
        """Records not yet folded (the most any inbox holds: samples, or requests)."""
        waiting = [traffic.inbox.samples for traffic in self._models.values()]
        return max([self._requests.waiting, *waiting])

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
            "marginwatch_predictions",
            "Samples predicted, by whether the decision is brittle at the served eps and by "
            "predicted class (the most predicted classes, the rest as other: "
            "MARGINWATCH_CLASS_LABELS)", labels=["model", "brittle", "class"],
        )  # fmt: skip
        scores = HistogramMetricFamily(
            "marginwatch_score", "Brittleness score of served samples (brittle below λ)",
            labels=["model"],
        )  # fmt: skip
        live = GaugeMetricFamily(
            "marginwatch_live_robust_accuracy_ratio",
            "Mean of g(score) = P(correct and robust at eps | score) over the recent served "
            "predictions, for each budget eps of the served version's grid (served=\"true\": "
            "the served eps)", labels=["model", "eps", "served"],
        )  # fmt: skip
        window = GaugeMetricFamily(
            "marginwatch_live_window_predictions",
            "Predictions in the served eps's live rolling window (the last N, none older than "
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
                for name, (brittle, not_brittle) in traffic.predictions.items():
                    predictions.add_metric([model, "true", name], brittle)
                    predictions.add_metric([model, "false", name], not_brittle)
                for eps, served, mean in traffic.live():
                    live.add_metric([model, eps, served], mean)
                window.add_metric([model], traffic.served_window_size())
        for model, queued_samples in sorted(self._queues.items()):
            queued.add_metric([model], queued_samples())
        yield from (execution, batch_size, predictions, scores, live, window, queued)
