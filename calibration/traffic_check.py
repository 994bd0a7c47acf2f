"""`marginwatch-calibrate --traffic DIR`: the served version's flag, checked on its own traffic
without labels, and with `--refit` a new version whose λ is fitted on that traffic too.

The calibration subset says how the flag does on the dataset; the check says how it does on what
was served. A uniform random sample of the traffic since `--since` (the service's shards, see
`artifact.traffic`) is attacked against the served labels, the same label-free margins the
calibration measures, which gives the true non-robust fraction of that traffic; the flags the
service returned are then scored against it (recall, precision, FPR), with Wilson intervals.

Nothing served changes: the check is published beside the served version, `traffic-check.json`
and a section of `report.html`, each replaced atomically; `model.onnx` and `calibration.json`
are not touched and CURRENT does not move. The attacks need the served model in torch: `--model`
(by default the served version's, `served_setup`) must be it, which the sample itself verifies
(the model must give every sampled input its served label), and the threat model is the served
version's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from marginwatch.artifact import store
from marginwatch.artifact.schema import REPORT_FILE, CalibrationRecord
from marginwatch.artifact.traffic import (
    Ratio,
    TrafficCheck,
    TrafficError,
    iter_samples,
    list_shards,
    newest_sample,
    traffic_models,
    write_atomically,
    write_traffic_check,
)
from marginwatch.calibration.config import (
    CalibrationConfig,
    CalibrationError,
    ConfigError,
    since_timestamp,
)
from marginwatch.calibration.inputs import Outputs, forward_all, load_model_shaped
from marginwatch.calibration.job import RunResult, TrafficPoints, load_margins, margins_for, run
from marginwatch.calibration.margin_cache import content_sha256
from marginwatch.calibration.margins import MarginResult
from marginwatch.calibration.metrics import detection_metrics, kendall_tau, nonrobust_mask
from marginwatch.calibration.preflight import PreflightReport
from marginwatch.calibration.record import attack_budgets
from marginwatch.calibration.report import TrafficReport, render_traffic_section, with_section
from marginwatch.calibration.served_setup import names_text, served_version, with_served_setup

Z_95 = 1.959963984540054  # the standard normal's 0.975 quantile
# Logit margins this small are ties that ONNX Runtime and torch may break differently (the
# export is verified to 1e-4): a label that differs there is no sign of another model.
LABEL_TIE = 1e-4


@dataclass(frozen=True)
class TrafficSample:
    """A uniform random sample of one version's served traffic, in the order it was served."""

    inputs: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    brittle: np.ndarray
    times: np.ndarray
    available: int  # samples of the version since `since`, of which these were drawn
    until: float  # when the newest of them was served
    other_versions: int  # samples since then that another version served
    broken: tuple[str, ...]  # why each skipped shard could not be read


@dataclass(frozen=True)
class TrafficResult:
    check: TrafficCheck
    check_path: Path
    refit: RunResult | None


def wilson_ratio(count: int, total: int) -> Ratio:
    """`count / total` with its 95 % Wilson score interval, which stays inside [0, 1] and keeps
    its coverage near 0 and 1, where most flags and most margins of a good model lie."""
    p = count / total
    z2n = Z_95**2 / total
    centre = (p + z2n / 2) / (1 + z2n)
    half = Z_95 * math.sqrt(p * (1 - p) / total + z2n / (4 * total)) / (1 + z2n)
    low, high = max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))
    return Ratio(value=p, ci_low=low, ci_high=high, count=count, total=total)


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def draw_sample(
    root: Path, model: str, version: str, *, since: float, size: int, seed: int
) -> TrafficSample:
    """Up to `size` samples served by `version` since `since`, drawn uniformly without
    replacement in one pass (the `size` smallest of i.i.d. uniform keys), so that memory holds
    the sample and one shard, whatever the traffic. Broken shards are skipped and counted."""
    if not root.is_dir():
        raise ConfigError(f"traffic folder {root} does not exist")
    if not list_shards(root, model):
        found = traffic_models(root)
        raise ConfigError(
            f"no traffic of {model!r} in {root}; found traffic of: {', '.join(found)}"
            if found
            else f"no traffic of {model!r} in {root}, nor of any model: is sampling on in the "
            "service (it writes MARGINWATCH_TRAFFIC_DIR)?"
        )
    rng = np.random.default_rng(seed)
    broken: list[str] = []
    kept: dict[str, np.ndarray] = {}
    keys = np.zeros(0)
    available = 0
    others: dict[str, int] = {}  # samples since then by the versions not checked
    until = -math.inf

    def skip(_: Path, error: TrafficError) -> None:
        broken.append(str(error))

    for _, shard in iter_samples(root, model, since, on_broken=skip):
        if shard.version != version:
            others[shard.version] = others.get(shard.version, 0) + len(shard)
            continue
        available += len(shard)
        until = max(until, float(shard.times.max()))
        arrays = {
            "inputs": shard.inputs,
            "labels": shard.labels,
            "scores": shard.scores,
            "brittle": shard.brittle,
            "times": shard.times,
        }
        keys = np.r_[keys, rng.random(len(shard))]
        kept = {k: np.concatenate([kept[k], a]) if kept else a for k, a in arrays.items()}
        best = np.argsort(keys, kind="stable")[:size]
        keys, kept = keys[best], {k: a[best] for k, a in kept.items()}
    if not kept:
        raise _nothing_to_check(root, model, version, since=since, broken=broken, others=others)
    order = np.argsort(kept["times"], kind="stable")
    return TrafficSample(
        **{k: a[order] for k, a in kept.items()},
        available=available,
        until=until,
        other_versions=sum(others.values()),
        broken=tuple(broken),
    )


def _nothing_to_check(
    root: Path, model: str, version: str, *, since: float, broken: list[str], others: dict[str, int]
) -> ConfigError:
    """Why no sample of `model` is left to check, naming what was found instead."""
    when = f"since {_iso(since)}"
    if broken and not others:
        return ConfigError(
            f"every traffic shard of {model!r} {when} is unreadable ({len(broken)}); "
            f"the first: {broken[0]}"
        )
    if others:
        found = ", ".join(f"{name} ({count})" for name, count in sorted(others.items()))
        return ConfigError(
            f"none of the {sum(others.values())} samples of {model!r} {when} was served by "
            f"version {version} (the one CURRENT names): nothing to check; found versions: {found}"
        )
    newest = newest_sample(root, model)
    found = "no readable sample" if newest is None else f"the newest sample is from {_iso(newest)}"
    return ConfigError(f"no traffic of {model!r} {when} in {root}; {found}: widen --since")


def check_same_model(config: CalibrationConfig, outputs: Outputs, served: np.ndarray) -> None:
    """`--model` must be the served model: every sampled input gets its served label, ties
    within the export's tolerance aside. Else the attacks would measure another model."""
    differ = (outputs.labels != served) & (outputs.scores > LABEL_TIE)
    if differ.any():
        raise ConfigError(
            f"--model {config.model} is not the served model: it labels {int(differ.sum())} of "
            f"{len(served)} sampled inputs differently from the service"
        )


def traffic_figures(
    record: CalibrationRecord,
    sample: TrafficSample,
    margins: MarginResult,
    *,
    config: CalibrationConfig,
    since: float,
    duration_s: float,
) -> TrafficCheck:
    """The flag's figures on the sample: non-robust against the served label at the served ε."""
    eps = record.threat_model.eps
    try:
        nonrobust = nonrobust_mask(margins.radius, margins.success, eps)
    except ValueError as error:
        raise CalibrationError(f"traffic margins: {error}") from error
    brittle = sample.brittle
    hits = int((brittle & nonrobust).sum())
    positives, brittle_count = int(nonrobust.sum()), int(brittle.sum())
    negatives = len(brittle) - positives
    scores = sample.scores.astype(np.float64)
    tau = kendall_tau(margins.radius, scores)
    auroc = detection_metrics(nonrobust, scores).auroc
    nonrobust_ratio, flagged_ratio = (
        wilson_ratio(positives, len(brittle)),
        wilson_ratio(brittle_count, len(brittle)),
    )
    return TrafficCheck(
        model_name=record.model_name,
        version=record.version,
        created_at=_iso(time.time()),
        traffic_since=since,
        traffic_until=sample.until,
        available_points=sample.available,
        seed=config.seed,
        threat_model=record.threat_model,
        attacks=attack_budgets(config, margins),
        censored=int((~margins.success).sum()),
        nonrobust=nonrobust_ratio,
        flagged=flagged_ratio,
        recall=hits / positives if positives else None,
        precision=hits / brittle_count if brittle_count else None,
        false_positive_rate=(brittle_count - hits) / negatives if negatives else None,
        kendall_tau=None if math.isnan(tau) else tau,
        auroc=None if math.isnan(auroc) else auroc,
        live_gauge=float(np.clip(record.live_curve(scores).mean(), 0.0, 1.0)),
        ratios_agree=nonrobust_ratio.ci_low <= flagged_ratio.ci_high
        and flagged_ratio.ci_low <= nonrobust_ratio.ci_high,
        duration_s=duration_s,
        other_version_points=sample.other_versions,
        broken_shards=len(sample.broken),
    )


def publish_check(version_dir: Path, check: TrafficCheck, section: str) -> Path:
    """`traffic-check.json` and the report's section, each replaced atomically; the version's
    other files are left byte for byte (the service verifies model.onnx's hash)."""
    path = write_traffic_check(version_dir, check)
    report = version_dir / REPORT_FILE
    if report.exists():
        write_atomically(report, with_section(report.read_text(), section).encode())
    return path


def sampled(
    config: CalibrationConfig,
    record: CalibrationRecord,
    since: float,
    notify: Callable[[str], None],
) -> TrafficSample:
    """The sample of the served version's traffic, in the served input shape."""
    if config.traffic is None:
        raise ConfigError("a traffic check needs --traffic DIR")
    sample = draw_sample(
        config.traffic,
        config.resolved_model_name,
        record.version,
        since=since,
        size=config.traffic_size,
        seed=config.seed,
    )
    if sample.broken:
        count, first = len(sample.broken), sample.broken[0]
        notify(f"skipped {count} unreadable traffic shard(s); the first: {first}")
    shape = tuple(record.input_shape)
    if len(shape) != 3 or sample.inputs.shape[1:] != shape:
        raise ConfigError(
            f"traffic inputs have shape {sample.inputs.shape[1:]}; the served version takes {shape}"
        )
    return sample


def refit_version(
    config: CalibrationConfig,
    record: CalibrationRecord,
    points: TrafficPoints,
    on_preflight: Callable[[PreflightReport], None] | None,
    notify: Callable[[str], None],
) -> RunResult:
    """The `--refit` version; `notify` hears when it names the classes otherwise than the served
    one does (which only a flag can make it do: `--class-names`, or `--dataset` with its own)."""
    result = run(config, on_preflight, traffic=points)
    if result.record is not None and result.record.class_names != record.class_names:
        notify(
            f"the new version {result.record.version} of {record.model_name!r} names the classes "
            f"{names_text(result.record.class_names)}; the served version {record.version} "
            f"named them {names_text(record.class_names)}"
        )
    return result


def run_traffic(
    config: CalibrationConfig,
    notify: Callable[[str], None],
    on_preflight: Callable[[PreflightReport], None] | None = None,
    inform: Callable[[str], None] | None = None,
) -> TrafficResult:
    """The check (and, with `--refit`, the new version), in the served version's setup where no
    flag gives another (`inform` hears what was reused). Raises as `job.run` does; every setup
    problem raises `ConfigError` before any attack; `notify` hears about skipped shards."""
    started = time.monotonic()
    version_dir, record = served_version(config)
    config, reused = with_served_setup(config, record)
    if inform is not None:
        inform(reused)
    name = config.resolved_model_name
    since = since_timestamp(config.since, time.time())
    sample = sampled(config, record, since, notify)
    shape = sample.inputs.shape[1:]
    model = load_model_shaped(
        config,
        (shape[0], shape[1], shape[2]),
        len(record.class_names),
        what="the served version takes",
    )
    # eval: a normalisation wrapper is built in training mode (the job's export sets it)
    model = model.to(config.torch_device).eval()
    outputs = forward_all(model, sample.inputs, config.torch_device)
    check_same_model(config, outputs, sample.labels)
    with store.model_lock(config.store, name):
        folder, size = margins_for(
            config,
            model,
            images=sample.inputs,
            labels=outputs.labels,
            data_id=f"traffic:{content_sha256(sample.inputs)}",
            indices=np.arange(len(sample.inputs)),
            phase="traffic margins",
        )
        margins = load_margins(config, folder, size)
        check = traffic_figures(
            record,
            sample,
            margins,
            config=config,
            since=since,
            duration_s=time.monotonic() - started,
        )
        section = render_traffic_section(
            TrafficReport(
                check=check,
                margins=margins.radius,
                success=margins.success,
                scores=sample.scores,
                brittle=sample.brittle,
                threshold=record.threshold,
            )
        )
        path = publish_check(version_dir, check, section)
    refit = None
    if config.refit:
        points = TrafficPoints(images=sample.inputs, outputs=outputs, margins=margins)
        refit = refit_version(config, record, points, on_preflight, notify)
    return TrafficResult(check, path, refit)
