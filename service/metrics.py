"""Every Prometheus object of the service, in one class with its own `CollectorRegistry` (one per
app instance, so tests and several apps in one process never collide): `ServiceMetrics`, whose
`observe_*` methods are called at stage boundaries. It holds the plain Prometheus objects (the
served calibration, reloads, the store, traffic sampling, client disconnects) and registers the
collectors: `ServedTraffic` (`served_traffic.py`: per-request and per-batch metrics, kept off the
request path) and, read at scrape, `ModelStates`, `TrafficChecks` and `AdmissionState`
(`state_metrics.py`).

Label values come only from fixed sets: model names are the served ones (configuration and the
artifact store, never a request path), versions are, per model, the one CURRENT names and the
one serving, endpoints are route names, status classes are `2xx`…`5xx`, `eps` the budgets of the
served version's grid and `class` its class names, capped (`version_labels.py`). The request
middleware (`middleware.py`) and the batch runner (`deployment.py`) record into it; the traffic
sampler (`traffic_sampler.py`) counts written and dropped samples here; the registry's poll shows
the latest `traffic-check.json` of each served version.
"""

from __future__ import annotations

from typing import Final, Literal, get_args

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Info,
    generate_latest,
)

from marginwatch.artifact.schema import CalibrationRecord
from marginwatch.artifact.traffic import TrafficCheck
from marginwatch.service.admission import Admission
from marginwatch.service.engine import Prediction, calibration_timestamp_s
from marginwatch.service.errors import ShedReason
from marginwatch.service.served_traffic import ServedTraffic
from marginwatch.service.settings import DEFAULT_CLASS_LABELS
from marginwatch.service.state_metrics import AdmissionState, ModelStates, TrafficChecks
from marginwatch.service.version_labels import ServedVersion

CONTENT_TYPE = CONTENT_TYPE_LATEST
TrafficDropReason = Literal["queue_full", "day_limit", "write_error"]
TRAFFIC_DROP_REASONS: Final[tuple[TrafficDropReason, ...]] = get_args(TrafficDropReason)


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


class ServiceMetrics:
    """The service's metrics; `observe_*` methods are called at stage boundaries."""

    def __init__(
        self,
        live_window_predictions: int,
        live_window_s: float = 600.0,
        traffic_sample_rate: float = 0.0,
        class_labels: int = DEFAULT_CLASS_LABELS,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.traffic = ServedTraffic(live_window_predictions, live_window_s, class_labels)
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
            "Robust accuracy estimated by the calibration job, on its evaluation set, at each "
            "budget eps of its grid (served=\"true\": the served eps)",
            ["model", "eps", "served"], registry=r,
        )  # fmt: skip
        self._budgets: dict[str, list[tuple[str, str]]] = {}  # the (eps, served) shown per model
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
        self._show_budgets(model, self.traffic.serve(model, record))
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

    def _show_budgets(self, model: str, version: ServedVersion | None) -> None:
        """The calibration's robust accuracy at each budget of `version`'s grid; the budgets of
        the version before that it lacks are gone (None: every one is)."""
        gauge = self.calibration_robust_accuracy
        for eps, served in self._budgets.pop(model, ()):
            gauge.remove(model, eps, served)
        if version is None:
            return
        for eps, served, budget in version.budget_labels():
            gauge.labels(model, eps, served).set(budget.robust_accuracy)
            self._budgets.setdefault(model, []).append((eps, served))

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
        for metric in (self.calibration_timestamp, self.calibration_info, self.calibration_flagged):
            metric.remove(model)
        self._show_budgets(model, None)
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
        """One model execution: its latency, size, flags by class, scores and the live
        estimates (`record`: the version that ran it)."""
        self.traffic.record(model, record, prediction, seconds)

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
