"""Collectors of state kept elsewhere, exported as it stands at each scrape: each model's
readiness and versions (`ModelStates`, read from the registry), the latest traffic check of each
served version (`TrafficChecks`, shown by the registry's poll) and the admission budgets
(`AdmissionState`, read from `admission.py`). Nothing here is on the request path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from marginwatch.artifact.traffic import TrafficCheck
from marginwatch.service.admission import Admission
from marginwatch.service.engine import iso_timestamp_s


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
