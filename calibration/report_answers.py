"""The report's sections on the robustness answers a version serves besides the flag: robust
accuracy over the budget grid, the reliability of p_robust, and the margin interval's coverage.

The grid's figures are the record's; the reliability diagram and the coverage are recomputed
from the subset's per-point arrays by the same cross-fitting the job records
(`answers.cross_fitted`, seed 0), so the page shows the points behind each recorded number.
Records older than the grid have none of it: each section then says "not recorded".
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import numpy as np

from marginwatch.artifact.schema import BudgetAnswers, CalibrationRecord
from marginwatch.calibration.answer_figures import (
    budget_plot,
    quantile_plot,
    reliability_bins,
    reliability_plot,
)
from marginwatch.calibration.answers import (
    FOLDS,
    AnswerChecks,
    Margins,
    cross_fitted,
    expected_calibration_error,
    interval_coverage,
)
from marginwatch.calibration.report_fields import number_text

__all__ = ["COVERAGE_BAND", "ECE_BAR", "SubsetPoints", "answers_sections"]

ECE_BAR = 0.05
"""The calibration error the benchmarks hold p_robust to (10 bins, held-out ground truth)."""
COVERAGE_BAND = 0.10
"""How far the benchmarks let the interval's coverage stray from its nominal level."""
_DEFAULT_INTERVAL = 0.8  # a grid without quantiles (never written by the job): the job's default


@dataclass(frozen=True)
class SubsetPoints:
    """The attacked subset as the checks read it: scores, correctness, and the margins (lower
    bounds where censored), or None where the censored points' bounds are unknown."""

    scores: np.ndarray
    correct: np.ndarray
    margins: Margins | None


def _figure(image: str, caption: str) -> str:
    return f"<figure>{image}<figcaption>{html.escape(caption)}</figcaption></figure>"


def _section(title: str, body: str) -> str:
    return f"<section><h2>{html.escape(title)}</h2>{body}</section>"


def _not_recorded(title: str, what: str) -> str:
    return _section(
        title,
        f"<p>Not recorded: this version's <code>calibration.json</code> predates {what}, so "
        "it serves the flag at its one budget ε only.</p>",
    )


def _estimate_cells(budget: BudgetAnswers) -> str:
    estimate = budget.robust_accuracy
    interval = "none (no bootstrap)"
    if estimate.ci_low is not None and estimate.ci_high is not None:
        interval = f"[{number_text(estimate.ci_low)}, {number_text(estimate.ci_high)}]"
    return f"<td>{number_text(estimate.estimate)}</td><td>{interval}</td>"


def _budget_table(budgets: list[BudgetAnswers], served_eps: float) -> str:
    rows = "".join(
        f"<tr><th>{b.eps:g}{' (served)' if b.eps == served_eps else ''}</th>"
        f"<td>{number_text(b.threshold)}</td>{_estimate_cells(b)}"
        f"<td>{number_text(b.subset_nonrobust)}</td>"
        f"<td>{'—' if b.p_robust_ece is None else number_text(b.p_robust_ece)}</td></tr>"
        for b in budgets
    )
    return (
        "<table><tr><th>budget ε'</th><th>λ(ε')</th><th>robust accuracy</th>"
        "<th>95 % interval</th><th>subset non-robust</th><th>p_robust ECE</th></tr>"
        f"{rows}</table>"
    )


def _measured(points: SubsetPoints, eps: float) -> float:
    """The subset's correct-and-robust share at `eps`; NaN where a censored bound leaves it
    unknown, or without margins."""
    if points.margins is None:
        return float("nan")
    try:
        return float(np.mean(points.correct & points.margins.robust(eps)))
    except ValueError:
        return float("nan")


def budget_section(record: CalibrationRecord, points: SubsetPoints) -> str:
    title = "Robust accuracy vs budget"
    if record.budgets is None:
        return _not_recorded(title, "the budget grid")
    served = record.threat_model.eps
    measured = np.array([_measured(points, b.eps) for b in record.budgets])
    method = record.budgets[0].robust_accuracy.method
    text = (
        "<p>The margins the attacks measured answer for other budgets ε' too, without another "
        f"attack: at each, λ(ε') by the job's rule ({html.escape(str(record.threshold_rule))}), "
        f"the robust-accuracy estimate ({html.escape(method)}) with its 95 % bootstrap interval, "
        "the share of the subset non-robust at ε', and the calibration error of p_robust there "
        f"(cross-fitted on the subset, 10 bins). A request picks a budget of the grid with "
        f"<code>eps</code> (v1) or <code>parameters.eps</code> (v2, gRPC); the served "
        f"ε = {served:g} is the default.</p>"
    )
    caption = (
        "The big set's estimated robust accuracy at each budget of the grid, with its 95 % "
        "interval; hollow diamonds: the subset's measured share, correct and not flipped "
        "within ε'. The red square is the served ε."
    )
    plot = _figure(budget_plot(record.budgets, served, measured), caption)
    return _section(
        title, f'{text}<div class="plots">{plot}</div>{_budget_table(record.budgets, served)}'
    )


def _bins_table(checks: AnswerChecks) -> str:
    bins = reliability_bins(checks.p_robust, checks.robust)
    rows = "".join(
        f"<tr><td>{low:.1f} to {low + 0.1:.1f}</td><td>{count}</td>"
        f"<td>{number_text(pred)}</td><td>{number_text(seen)}</td></tr>"
        for low, count, pred, seen in zip(
            bins.lower, bins.count, bins.predicted, bins.observed, strict=True
        )
    )
    return (
        '<table class="inner"><tr><th>p_robust</th><th>points</th><th>mean p_robust</th>'
        f"<th>robust share</th></tr>{rows}</table>"
    )


def reliability_section(
    record: CalibrationRecord, points: SubsetPoints, checks: AnswerChecks | None
) -> str:
    title = "Reliability of p_robust"
    if record.budgets is None:
        return _not_recorded(title, "p_robust")
    if checks is None:
        return _section(title, "<p>Not shown: the censored points' bounds were not given.</p>")
    eps = record.threat_model.eps
    ece = expected_calibration_error(checks.p_robust, checks.robust)
    text = (
        "<p>p_robust is the served probability that a decision is robust at the budget, that "
        "is, that no perturbation within ε' flips the predicted class (no label needed). Here "
        f"each of the {points.scores.size} subset points gets its p_robust at ε = {eps:g} from "
        f"the fit on the other {FOLDS - 1} of {FOLDS} folds, so no point judges a fit that saw "
        "it, and is set against what the attacks found. On the diagonal a p_robust of 0.8 comes "
        f"true 8 times in 10. Expected calibration error: <b>{number_text(ece)}</b> (the "
        f"benchmarks' bar, on held-out ground truth: ≤ {ECE_BAR:g}).</p>"
    )
    caption = (
        "Out-of-fold p_robust at the served ε in 10 bins: the bin's mean against the share of "
        "its points the attacks found robust; the number over each dot is its points."
    )
    image = _figure(reliability_plot(checks, eps, ece), caption)
    return _section(title, f'{text}<div class="plots">{image}{_bins_table(checks)}</div>')


def _coverage_table(checks: AnswerChecks, nominal: float) -> str:
    value, observed = checks.margins.value, checks.margins.observed
    known = observed | (value >= checks.high)
    below = int((observed & (value < checks.low)).sum())
    above = int((observed & (value > checks.high)).sum())
    coverage = interval_coverage(checks)
    cells = (
        ("nominal coverage", f"{100 * nominal:g} %"),
        ("out-of-fold coverage", f"{number_text(100 * coverage)} %"),
        ("points judged", f"{int(known.sum())} of {value.size}"),
        ("below the interval", str(below)),
        ("above the interval", str(above)),
    )
    rows = "".join(f"<tr><th>{name}</th><td>{cell}</td></tr>" for name, cell in cells)
    return f"<table>{rows}</table>"


def coverage_section(
    record: CalibrationRecord, points: SubsetPoints, checks: AnswerChecks | None
) -> str:
    title = "Margin interval"
    quantiles = record.margin_quantiles
    if quantiles is None:
        return _not_recorded(title, "the margin estimates")
    if checks is None or points.margins is None:
        return _section(title, "<p>Not shown: the censored points' bounds were not given.</p>")
    low, high = quantiles.levels[0], quantiles.levels[-1]
    text = (
        "<p>Each prediction's <code>margin_estimate</code> and <code>margin_interval</code> "
        f"are the median and the {100 * low:g} % and {100 * high:g} % quantiles of the input "
        "margin given its score, in the threat model's norm: fitted per score bin with censored "
        "margins as lower bounds (Kaplan–Meier), then made to rise with the score. Out of fold, "
        f"the interval should hold {100 * quantiles.interval:g} % of the margins (the benchmarks "
        f"allow ± {100 * COVERAGE_BAND:g} points). A censored point is judged only where its "
        "bound passes the interval's high end; elsewhere it may lie either side.</p>"
    )
    caption = (
        "The subset's margins against their scores, with the recorded quantile curves (fitted "
        "on every point); censored points sit at their bound, or at the top edge when it lies "
        "beyond. The coverage beside it is out of fold."
    )
    image = _figure(
        quantile_plot(points.scores, points.margins, quantiles, record.threat_model.eps), caption
    )
    return _section(
        title,
        f'{text}<div class="plots">{image}{_coverage_table(checks, quantiles.interval)}</div>',
    )


def answers_sections(record: CalibrationRecord, points: SubsetPoints) -> str:
    """The three sections, each "not recorded" for a record older than the answers."""
    checks = None
    answered = record.budgets is not None or record.margin_quantiles is not None
    if points.margins is not None and answered:
        quantiles = record.margin_quantiles
        interval = _DEFAULT_INTERVAL if quantiles is None else quantiles.interval
        eps = record.threat_model.eps
        checks = cross_fitted(points.scores, points.margins, eps, interval, seed=0)
    return (
        budget_section(record, points)
        + reliability_section(record, points, checks)
        + coverage_section(record, points, checks)
    )
