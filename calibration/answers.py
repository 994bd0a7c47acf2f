"""Fitting the robustness answers (`artifact.answers` serves them) from the margins the job
already measured: for each budget ε' of the grid, λ(ε'), the robust-accuracy estimate, the
curves P(robust | s) and P(correct and robust | s); the margin's conditional quantiles given the
score; and their held-out checks (cross-fitted on the subset), which the record and the report
carry. No attack here: every figure is a fit of the subset's margins against its scores.

Censored margins (every attack failed) are lower bounds. At a budget below the bound a censored
point is robust, as `metrics.nonrobust_mask` says; a budget at or above a bound is refused. The
quantiles treat them as survival data: Kaplan–Meier per score bin, so a bound is never read as a
margin (dropping them, or taking them at face value, would bias the distances low).

Pure numpy/scipy.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from scipy.optimize import isotonic_regression

from marginwatch.artifact.schema import (
    BudgetAnswers,
    Curve,
    EstimateMethod,
    MarginQuantiles,
    RobustAccuracyEstimate,
)
from marginwatch.calibration.estimators import (
    estimate_robust_accuracy,
    fit_isotonic_curve,
    fit_live_curve,
)
from marginwatch.calibration.metrics import nonrobust_mask
from marginwatch.calibration.progress import Advance, ignore
from marginwatch.calibration.threshold import ThresholdRule

__all__ = [
    "AnswerChecks",
    "Margins",
    "Subset",
    "budget_answers",
    "cross_fitted",
    "expected_calibration_error",
    "fit_budget",
    "fit_margin_quantiles",
    "fit_p_robust",
    "interval_coverage",
    "km_quantiles",
    "quantile_levels",
    "reliability_table",
    "table_ece",
]

FOLDS = 5
ECE_BINS = 10
POINTS_PER_BIN = 40  # score bins of the quantile fit: about this many points each
MAX_BINS = 25


@dataclass(frozen=True)
class Margins:
    """Label-free input margins as the fits read them: `value` is the margin where `observed`,
    else the lower bound the attacks reached (censored)."""

    value: np.ndarray
    observed: np.ndarray

    @classmethod
    def of(cls, radius: np.ndarray, success: np.ndarray, censored_at: np.ndarray) -> Margins:
        return cls(np.where(success, radius, censored_at).astype(np.float64), success.copy())

    def robust(self, eps: float) -> np.ndarray:
        """margin > eps; a ValueError where a censored bound leaves it unknown."""
        return ~nonrobust_mask(self.value, self.observed, eps)

    def join(self, other: Margins) -> Margins:
        return Margins(np.r_[self.value, other.value], np.r_[self.observed, other.observed])


@dataclass(frozen=True)
class AnswerChecks:
    """Out-of-fold predictions on the subset, for the report's reliability diagram and coverage:
    `p_robust[i]` and `robust[i]` at the served ε, `low`, `high` the interval, `margins` the
    margins (lower bounds where censored), each point predicted by fits that never saw it."""

    p_robust: np.ndarray
    robust: np.ndarray
    low: np.ndarray
    high: np.ndarray
    margins: Margins


def quantile_levels(interval: float) -> list[float]:
    """The low, middle and high levels of an `interval` (0.8: 0.1, 0.5, 0.9)."""
    tail = round((1.0 - interval) / 2.0, 12)  # 0.1, not 0.09999999999999998
    return [tail, 0.5, round(1.0 - tail, 12)]


def fit_p_robust(scores: np.ndarray, robust: np.ndarray) -> Curve:
    """P(margin > ε' | score): isotonic, on every point (label-free)."""
    return fit_isotonic_curve(scores, robust.astype(np.float64))


def reliability_table(p: np.ndarray, outcome: np.ndarray, bins: int = ECE_BINS) -> np.ndarray:
    """Per equal-width bin of p in [0, 1]: the count, Σ p and Σ outcome (rows 0, 1, 2). Tables
    of several samples add up (pooled), and `table_ece` reads the calibration error off one."""
    p = np.asarray(p, dtype=np.float64)
    slot = np.minimum((p * bins).astype(np.int64), bins - 1)
    return np.stack(
        [
            np.bincount(slot, minlength=bins).astype(np.float64),
            np.bincount(slot, weights=p, minlength=bins),
            np.bincount(slot, weights=outcome.astype(np.float64), minlength=bins),
        ]
    )


def table_ece(table: np.ndarray) -> float:
    """Σ_bins (n_b / n) · |mean p − mean outcome| of a reliability table."""
    return float(np.abs(table[1] - table[2]).sum() / max(table[0].sum(), 1.0))


def expected_calibration_error(p: np.ndarray, outcome: np.ndarray, bins: int = ECE_BINS) -> float:
    """Σ_bins (n_b / n) · |mean p − mean outcome| over equal-width bins of p in [0, 1]."""
    return table_ece(reliability_table(p, outcome, bins))


def km_quantiles(value: np.ndarray, observed: np.ndarray, levels: list[float]) -> np.ndarray:
    """Kaplan–Meier quantiles of right-censored data: for each level q the least value t with
    F(t) = 1 − S(t) ≥ q. A level the estimate never reaches (the upper tail is censored) gets the
    largest value seen, a floor of the true quantile. Without censoring: the empirical
    quantiles (inverse CDF)."""
    times, slot = np.unique(value, return_inverse=True)
    events = np.bincount(slot, weights=observed.astype(np.float64), minlength=times.size)
    at_risk = np.bincount(slot, minlength=times.size)[::-1].cumsum()[::-1]
    dead = 1.0 - np.cumprod(1.0 - events / at_risk)
    # 1e-12: a cumulative product of exact fractions lands a hair below q
    found = np.searchsorted(dead, np.asarray(levels) - 1e-12, side="left")
    return times[np.minimum(found, times.size - 1)]


def fit_margin_quantiles(scores: np.ndarray, margins: Margins, interval: float) -> MarginQuantiles:
    """Per score bin (equal counts) the Kaplan–Meier quantiles of the margin at the interval's
    levels, then made non-decreasing in the score (weighted isotonic regression per level, as
    margin consistency says the margin grows with the score) and in the level. Knots at each
    bin's median score."""
    levels = quantile_levels(interval)
    order = np.argsort(scores, kind="stable")
    bins = int(np.clip(len(scores) // POINTS_PER_BIN, 1, MAX_BINS))
    parts = np.array_split(order, bins)
    knots_x = np.array([np.median(scores[part]) for part in parts])
    weights = np.array([len(part) for part in parts], dtype=np.float64)
    raw = np.column_stack(
        [km_quantiles(margins.value[part], margins.observed[part], levels) for part in parts]
    )
    rows = np.stack([isotonic_regression(row, weights=weights).x for row in raw])
    rows = np.maximum.accumulate(rows, axis=0)
    knots_x, first = np.unique(knots_x, return_index=True)  # tied medians: one knot
    return MarginQuantiles(
        levels=levels,
        knots_x=knots_x.tolist(),
        knots_y=np.maximum(rows[:, first], 0.0).tolist(),
        interval=interval,
    )


def _folds(size: int, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(train, held) index pairs of a `FOLDS`-fold split; a single point is its own train
    set (there is nothing else to fit on)."""
    for held in np.array_split(np.random.default_rng(seed).permutation(size), min(FOLDS, size)):
        train = np.setdiff1d(np.arange(size), held)
        yield (held if train.size == 0 else train), held


def cross_fitted(
    scores: np.ndarray, margins: Margins, eps: float, interval: float, seed: int
) -> AnswerChecks:
    """Each subset point's p_robust (at `eps`) and margin interval from fits on the other
    folds."""
    robust = margins.robust(eps)
    low, high = np.empty(scores.size), np.empty(scores.size)
    for train, held in _folds(scores.size, seed):
        fit_margins = Margins(margins.value[train], margins.observed[train])
        quantiles = fit_margin_quantiles(scores[train], fit_margins, interval)(scores[held])
        low[held], high[held] = quantiles[0], quantiles[-1]
    p = cross_fitted_p_robust(scores, robust, seed)  # the same folds
    return AnswerChecks(p, robust, low, high, margins)


def interval_coverage(checks: AnswerChecks) -> float:
    """Share of points whose margin lies in [low, high]; a censored margin (a bound b) counts as
    inside when b ≥ low and high is the floor it never reached, i.e. b ≥ high too: unknown
    otherwise, so those points are left out."""
    value, observed = checks.margins.value, checks.margins.observed
    inside = (value >= checks.low) & (value <= checks.high)
    known = observed | (value >= checks.high)
    censored_inside = ~observed & (value >= checks.high)
    hits = np.where(observed, inside, censored_inside)
    return float(hits[known].mean()) if known.any() else float("nan")


@dataclass(frozen=True)
class Subset:
    """The attacked points the fits read: labelled (the subset: `scores`, `correct`,
    `margins`) and label-free (`free_scores`, `free_margins`: the subset and any attacked traffic
    points of a `--refit`), with the big set's scores and correctness for the estimates."""

    scores: np.ndarray
    correct: np.ndarray
    margins: Margins
    free_scores: np.ndarray
    free_margins: Margins
    big_scores: np.ndarray
    big_correct: np.ndarray


def fit_budget(
    eps: float,
    subset: Subset,
    *,
    rule: ThresholdRule,
    estimator: EstimateMethod,
    bootstrap: int,
    seed: int,
    advance: Advance = ignore,
) -> BudgetAnswers:
    """λ(ε'), the robust-accuracy estimate and the curves at one budget; `rule` fits λ on the
    subset (and on any traffic points it holds itself, see `record.fitted_with_points`)."""
    robust = subset.margins.robust(eps)
    estimate = estimate_robust_accuracy(
        subset.scores,
        subset.correct,
        robust,
        subset.big_scores,
        subset.big_correct,
        threshold_rule=rule,
        method=estimator,
        bootstrap=bootstrap,
        seed=seed,
        advance=advance,
    )
    return budget_answers(eps, subset, threshold=rule(subset.scores, ~robust), estimate=estimate)


def budget_answers(
    eps: float, subset: Subset, *, threshold: float, estimate: RobustAccuracyEstimate
) -> BudgetAnswers:
    """A budget's answers around its λ and estimate: the curves, the non-robust share, and
    p_robust's cross-fitted calibration error."""
    robust = subset.margins.robust(eps)
    held_out = cross_fitted_p_robust(subset.scores, robust, seed=0)
    return BudgetAnswers(
        eps=eps,
        threshold=float(threshold),
        robust_accuracy=estimate,
        subset_nonrobust=float(np.mean(~robust)),
        p_robust=fit_p_robust(subset.free_scores, subset.free_margins.robust(eps)),
        live_curve=fit_live_curve(subset.scores, subset.correct, robust),
        p_robust_ece=expected_calibration_error(held_out, robust),
    )


def cross_fitted_p_robust(scores: np.ndarray, robust: np.ndarray, seed: int) -> np.ndarray:
    """Each point's p_robust from the fit on the other folds."""
    p = np.empty(scores.size)
    for train, held in _folds(scores.size, seed):
        p[held] = fit_p_robust(scores[train], robust[train])(scores[held])
    return p
