"""The report's plots of the robustness answers: robust accuracy over the budget grid, the
reliability diagram of p_robust, and the margin's quantile curves over the subset's points.

Each returns an ``<img>`` tag (`plotting.png`); matplotlib is imported only when one is drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from marginwatch.artifact.schema import BudgetAnswers, MarginQuantiles
from marginwatch.calibration.answers import ECE_BINS, AnswerChecks, Margins, reliability_table
from marginwatch.calibration.plotting import CORRECT, WRONG, finish, new_axes

__all__ = [
    "ReliabilityBins",
    "budget_plot",
    "quantile_plot",
    "reliability_bins",
    "reliability_plot",
]

_GREY = "#777777"


@dataclass(frozen=True)
class ReliabilityBins:
    """The non-empty bins of predicted probability (equal width on [0, 1], as
    `answers.expected_calibration_error` bins them): each bin's lower edge, its points, their
    mean prediction and the share that came true."""

    lower: np.ndarray
    count: np.ndarray
    predicted: np.ndarray
    observed: np.ndarray


def reliability_bins(p: np.ndarray, outcome: np.ndarray, bins: int = ECE_BINS) -> ReliabilityBins:
    count, total_p, total_true = reliability_table(p, outcome, bins)
    filled = count > 0
    return ReliabilityBins(
        lower=np.arange(bins)[filled] / bins,
        count=count[filled],
        predicted=total_p[filled] / count[filled],
        observed=total_true[filled] / count[filled],
    )


def budget_plot(budgets: Sequence[BudgetAnswers], served_eps: float, measured: np.ndarray) -> str:
    """Each budget's robust-accuracy estimate with its 95 % interval (none drawn where the
    record has none), the subset's measured share beside it, the served ε marked. The budgets
    are spaced by ratio (log axis): a grid such as ε/4 … 2ε is geometric."""
    fig, ax = new_axes()
    eps = np.array([b.eps for b in budgets])
    estimate = np.array([b.robust_accuracy.estimate for b in budgets])
    low = np.array([_or(b.robust_accuracy.ci_low, b.robust_accuracy.estimate) for b in budgets])
    high = np.array([_or(b.robust_accuracy.ci_high, b.robust_accuracy.estimate) for b in budgets])
    error = np.maximum(np.stack([estimate - low, high - estimate]), 0.0)
    ax.errorbar(eps, estimate, yerr=error, fmt="o-", color=CORRECT, capsize=4,
                label="estimate, 95 % interval")  # fmt: skip
    if np.isfinite(measured).any():
        ax.plot(eps, measured, "D", mfc="none", color=_GREY, label="subset, measured")
    served = eps == served_eps
    ax.plot(eps[served], estimate[served], "s", color=WRONG, ms=8, label="served ε")
    ax.axvline(served_eps, color=WRONG, ls="--", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xticks(eps, [f"{value:g}" for value in eps])
    ax.minorticks_off()
    return finish(
        fig, ax, xlabel="budget ε'", ylabel="robust accuracy", title="robust accuracy vs budget",
        legend={"fontsize": 8},
    )  # fmt: skip


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def reliability_plot(checks: AnswerChecks, eps: float, ece: float) -> str:
    """Out-of-fold p_robust against the robust share, one dot per bin with its point count; on
    the diagonal a probability comes true as often as it says."""
    fig, ax = new_axes()
    bins = reliability_bins(checks.p_robust, checks.robust)
    ax.plot([0, 1], [0, 1], color=_GREY, lw=0.8, ls=":", label="perfectly calibrated")
    ax.plot(bins.predicted, bins.observed, "o-", color=CORRECT, label="subset, out of fold")
    for x, y, n in zip(bins.predicted, bins.observed, bins.count, strict=True):
        ax.annotate(f"{n}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center",
                    fontsize=7)  # fmt: skip
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.08)
    return finish(
        fig, ax, xlabel="predicted p_robust (bin mean)", ylabel="robust share (attacks)",
        title=f"p_robust at ε = {eps:g}: ECE = {ece:.3f}", legend={"fontsize": 8, "loc": "best"},
    )  # fmt: skip


def quantile_plot(
    scores: np.ndarray, margins: Margins, quantiles: MarginQuantiles, eps: float
) -> str:
    """The subset's margins against their scores, censored ones at their bound (at the top
    edge when the bound lies beyond it), with the fitted quantile curves and the band between
    the outer ones."""
    fig, ax = new_axes()
    knots = np.asarray(quantiles.knots_x)
    grid = np.linspace(min(scores.min(), knots[0]), max(scores.max(), knots[-1]), 200)
    curves = quantiles(grid)
    observed = margins.observed
    seen = margins.value[observed]
    top = 1.1 * max(float(seen.max()) if seen.size else 0.0, float(curves.max()), eps)
    ax.fill_between(grid, curves[0], curves[-1], color=CORRECT, alpha=0.12,
                    label=f"{100 * quantiles.interval:g} % interval")  # fmt: skip
    for level, curve in zip(quantiles.levels, curves, strict=True):
        name = "median" if level == 0.5 else f"{100 * level:g} % quantile"
        ax.plot(grid, curve, color=CORRECT, lw=1.6 if level == 0.5 else 1.0,
                ls="-" if level == 0.5 else "--", label=name)  # fmt: skip
    ax.scatter(scores[observed], seen, s=8, c=_GREY, alpha=0.6, label="margin")
    if not observed.all():
        bound = np.minimum(margins.value[~observed], top)
        ax.scatter(scores[~observed], bound, s=18, c=WRONG, marker="^", label="censored (≥ bound)")
    ax.axhline(eps, color="k", ls=":", lw=1, label="served ε")
    ax.set_ylim(0.0, 1.05 * top)
    return finish(
        fig, ax, xlabel="score s(x)", ylabel="input margin", title="margin given the score",
        legend={"fontsize": 7, "loc": "upper left"},
    )  # fmt: skip
