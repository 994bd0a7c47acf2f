"""Turn measured margins and scores into the figures of `calibration.json`."""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from marginwatch.artifact.flags import brittle
from marginwatch.artifact.schema import (
    AttackBudget,
    BudgetAnswers,
    CalibrationRecord,
    DataSource,
    MarginQuantiles,
    ModelSource,
    PseudoMarginFacts,
    RobustAccuracyEstimate,
    ThreatModel,
    ThresholdRuleSpec,
)
from marginwatch.calibration.answers import (
    Margins,
    Subset,
    budget_answers,
    cross_fitted,
    fit_budget,
    fit_margin_quantiles,
    interval_coverage,
)
from marginwatch.calibration.config import CalibrationConfig, ConfigError
from marginwatch.calibration.estimators import estimate_robust_accuracy, fit_live_curve
from marginwatch.calibration.margins import MarginResult
from marginwatch.calibration.metrics import detection_metrics, kendall_tau, nonrobust_mask
from marginwatch.calibration.progress import Advance, phase
from marginwatch.calibration.report import ReportData
from marginwatch.calibration.threshold import ThresholdRule, make_threshold_rule


def threshold_rule_spec(config: CalibrationConfig) -> ThresholdRuleSpec:
    """The configured rule as the artifact spells it. The config always holds a target TPR (it
    has a default); only the target-tpr rule takes it."""
    target_tpr = config.target_tpr if config.threshold_rule == "target-tpr" else None
    return ThresholdRuleSpec.model_validate(
        {"name": config.threshold_rule, "target_tpr": target_tpr}
    )


def data_source(config: CalibrationConfig, size: int, seed: int | None = None) -> DataSource:
    """The configured data (the subset's, with its seed, or the big set's): what `--refit`
    reuses."""
    data_dir = None if config.data_dir is None else str(config.data_dir)
    return DataSource(
        dataset=config.dataset, split=config.split, size=size, seed=seed, data_dir=data_dir
    )


def model_source(config: CalibrationConfig) -> ModelSource:
    """The model and its normalisation as configured: what `--traffic` and `--refit` reuse."""
    return ModelSource(
        model=config.model,
        weights=None if config.weights is None else str(config.weights),
        input_range=config.input_range,
        mean=config.mean,
        std=config.std,
    )


def attack_budgets(config: CalibrationConfig, margins: MarginResult) -> list[AttackBudget]:
    """Each configured attack, its steps, and on how many points it found an adversarial."""
    return [
        AttackBudget(name=n, steps=s, succeeded=int(np.isfinite(margins.per_attack[n]).sum()))
        for n, s in config.resolved_attacks
    ]


def fitted_with_points(
    rule: ThresholdRule, scores: np.ndarray, nonrobust: np.ndarray
) -> ThresholdRule:
    """`rule`, fitted on the points it is given plus these fixed ones (`--refit`'s traffic):
    the count estimator's bootstrap then resamples the subset and keeps the traffic points."""

    def fit(subset_scores: np.ndarray, subset_nonrobust: np.ndarray) -> float:
        return rule(np.r_[subset_scores, scores], np.r_[subset_nonrobust, nonrobust])

    return fit


def rule_at(
    spec: ThresholdRuleSpec, eps: float, threshold_points: tuple[np.ndarray, MarginResult] | None
) -> ThresholdRule:
    """The job's threshold rule at budget `eps`, with `--refit`'s traffic points (non-robust at
    `eps`) joining each fit."""
    rule = make_threshold_rule(spec)
    if threshold_points is None:
        return rule
    extra_scores, extra_margins = threshold_points
    return fitted_with_points(
        rule, extra_scores, nonrobust_mask(extra_margins.radius, extra_margins.success, eps)
    )


def answer_points(
    margins: MarginResult,
    *,
    scores: np.ndarray,
    correct: np.ndarray,
    big_scores: np.ndarray,
    big_correct: np.ndarray,
    threshold_points: tuple[np.ndarray, MarginResult] | None,
) -> Subset:
    """The points the robustness answers are fitted on: the subset, labelled, and with
    `--refit`'s traffic points for the label-free curves."""
    own = Margins.of(margins.radius, margins.success, margins.censored_at)
    free_scores, free_margins = scores, own
    if threshold_points is not None:
        extra_scores, extra = threshold_points
        free_scores = np.r_[scores, extra_scores]
        free_margins = own.join(Margins.of(extra.radius, extra.success, extra.censored_at))
    return Subset(scores, correct, own, free_scores, free_margins, big_scores, big_correct)


def grid_answers(
    config: CalibrationConfig,
    subset: Subset,
    *,
    served: BudgetAnswers,
    threshold_points: tuple[np.ndarray, MarginResult] | None,
    advance: Advance,
) -> list[BudgetAnswers]:
    """Every budget of the grid, `served` at the served ε; a budget that a censored margin's
    bound leaves undecided is refused, naming the flag."""
    spec = threshold_rule_spec(config)
    try:
        return [
            served
            if budget == served.eps
            else fit_budget(
                budget,
                subset,
                rule=rule_at(spec, budget, threshold_points),
                estimator=config.estimator,
                bootstrap=config.bootstrap,
                seed=config.seed,
                advance=advance,
            )
            for budget in config.resolved_eps_grid
        ]
    except ValueError as error:
        raise ConfigError(f"--eps-grid: {error}") from None


def margin_quantiles(subset: Subset, eps: float, interval: float) -> MarginQuantiles:
    """The margin's quantiles given the score, with the interval's cross-fitted coverage."""
    fitted = fit_margin_quantiles(subset.free_scores, subset.free_margins, interval)
    checks = cross_fitted(subset.scores, subset.margins, eps, interval, seed=0)
    coverage = interval_coverage(checks)
    return fitted.model_copy(update={"coverage": None if np.isnan(coverage) else coverage})


def build_record(
    *,
    config: CalibrationConfig,
    version: str,
    model_sha256: str,
    input_shape: list[int],
    class_names: list[str],
    margins: MarginResult,
    subset_scores: np.ndarray,
    subset_correct: np.ndarray,
    big_scores: np.ndarray,
    big_correct: np.ndarray,
    big_labels: np.ndarray,
    guard_band: float,
    pseudo_facts: PseudoMarginFacts | None,
    attacks: list[AttackBudget],
    subset_source: DataSource,
    big_source: DataSource,
    duration_s: float,
    software: dict[str, str],
    threshold_points: tuple[np.ndarray, MarginResult] | None = None,
) -> CalibrationRecord:
    """The record; `threshold_points` (scores and margins of attacked traffic, `--refit`) join
    the subset in λ's fit, every other figure is the subset's."""
    eps = config.resolved_eps
    nonrobust = nonrobust_mask(margins.radius, margins.success, eps)
    robust = ~nonrobust
    detection = detection_metrics(nonrobust, subset_scores)
    rule_spec = threshold_rule_spec(config)
    rule = rule_at(rule_spec, eps, threshold_points)
    threshold = rule(subset_scores, nonrobust)
    grid = config.resolved_eps_grid
    # one bar over both estimators' resamples, and the other budgets' estimates
    resamples = (1 + len(grid)) * config.bootstrap
    bar = phase("bootstrap", resamples, enabled=config.progress, unit="resample")
    with bar as advance:
        estimates = [
            estimate_robust_accuracy(
                subset_scores,
                subset_correct,
                robust,
                big_scores,
                big_correct,
                threshold_rule=rule,
                method=method,
                bootstrap=config.bootstrap,
                seed=config.seed,
                advance=advance,
            )
            for method in ("count", "regression")
        ]
        chosen = next(e for e in estimates if e.method == config.estimator)
        subset = answer_points(
            margins,
            scores=subset_scores,
            correct=subset_correct,
            big_scores=big_scores,
            big_correct=big_correct,
            threshold_points=threshold_points,
        )
        budgets = grid_answers(
            config,
            subset,
            served=budget_answers(eps, subset, threshold=threshold, estimate=chosen),
            threshold_points=threshold_points,
            advance=advance,
        )
    not_brittle = ~brittle(subset_scores, threshold)
    precision = (subset_correct & robust)[not_brittle].mean() if not_brittle.any() else 0.0
    return CalibrationRecord(
        model_name=config.resolved_model_name,
        version=version,
        model_sha256=model_sha256,
        input_shape=input_shape,
        class_names=class_names,
        threat_model=ThreatModel(norm=config.norm, eps=eps),
        score_kind="pseudo-margin" if pseudo_facts and pseudo_facts.chosen else "logit-margin",
        threshold=float(threshold),
        threshold_rule=rule_spec,
        guard_band=guard_band,
        subset=subset_source,
        big_set=big_source,
        attacks=attacks,
        censored=int((~margins.success).sum()),
        kendall_tau=kendall_tau(margins.radius, subset_scores),
        auroc=detection.auroc,
        aupr=detection.aupr,
        fpr_at_95_tpr=detection.fpr_at_95_tpr,
        subset_clean_accuracy=float(subset_correct.mean()),
        subset_robust_accuracy=float((subset_correct & robust).mean()),
        big_set_clean_accuracy=float(big_correct.mean()),
        robust_accuracy=chosen,
        robust_accuracy_estimates=estimates,
        precision_not_brittle=float(precision),
        live_curve=fit_live_curve(subset_scores, subset_correct, robust),
        pseudo_margin=pseudo_facts,
        budgets=budgets,
        margin_quantiles=margin_quantiles(subset, eps, config.margin_interval),
        predicted_class_counts=np.bincount(big_labels, minlength=len(class_names)).tolist(),
        model_source=model_source(config),
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        duration_s=duration_s,
        software=software,
    )


def _estimate_text(estimate: RobustAccuracyEstimate, *, digits: int) -> str:
    """``0.703 [0.684, 0.724]``; the point alone when the estimate has no interval."""
    text = f"{estimate.estimate:.{digits}f}"
    if estimate.ci_low is None or estimate.ci_high is None:
        return text
    return f"{text} [{estimate.ci_low:.{digits}f}, {estimate.ci_high:.{digits}f}]"


def report_data(
    record: CalibrationRecord, margins: MarginResult, scores: np.ndarray, correct: np.ndarray
) -> ReportData:
    """What the HTML report shows for `record`, with the subset's per-point arrays."""
    estimate = record.robust_accuracy
    headline: dict[str, str | float | int] = {
        "model": record.model_name,
        "version": record.version,
        "threat model": f"{record.threat_model.norm}, ε = {record.threat_model.eps:g}",
        "score": record.score_kind,
        f"robust accuracy ({estimate.method})": _estimate_text(estimate, digits=3),
    }
    return ReportData(
        margins=margins.radius,
        success=margins.success,
        scores=scores,
        correct=correct,
        eps=record.threat_model.eps,
        threshold=record.threshold,
        title=f"marginwatch calibration: {record.model_name} {record.version}",
        headline=headline,
        record=record,  # the report renders its fields for people, not as dict text
        censored_at=margins.censored_at,  # the censored margins' bounds, for the answers' checks
    )


def with_refit_facts(data: ReportData, traffic_points: int, since: str) -> ReportData:
    """The report of a `--refit` version says where λ came from: the record has no field for it."""
    summary = {
        **data.summary,
        "λ fitted on": f"the subset and {traffic_points} attacked traffic points (since {since})",
    }
    return dataclasses.replace(data, summary=summary)
