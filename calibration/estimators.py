"""Robust accuracy of a large labelled set, estimated from a small attacked subset.

Pure numpy/scipy (no torch). Fitted curves are the artifact's own `Curve` (plain data, what the
service evaluates as the live curve g) and estimates the artifact's `RobustAccuracyEstimate`, so
what is fitted here is what gets written and served, with no conversion between.

Inputs, everywhere in this module:

* ``*_scores``: the detector score s(x), larger = more robust (finite floats).
* ``*_correct``: the prediction matches the label (boolean).
* ``subset_robust``: ``input margin > eps``, the margin measured against the *predicted* label
  (label-free), i.e. ``~metrics.nonrobust_mask(...)``. A censored margin (every
  attack failed) counts as robust when its lower bound exceeds eps, which ``nonrobust_mask``
  checks. It is the complement of the detection task's positive class, so
  ``threshold_rule(scores, ~subset_robust)`` fits λ and robust accuracy is
  ``mean(correct & robust)``.

Two estimators (compare them on the same seeds):

* ``"count"`` (the paper's): fit λ on the subset, then ``mean(correct & not brittle)`` on the
  big set (``flags.brittle``: score < λ, the served flag). It inherits the subset's sampling
  error in λ and the detector's misflags.
* ``"regression"``: fit r(s) = P(robust | score = s, correct) by isotonic regression on the
  subset's *correctly classified* points, then ``mean(correct · r(score))`` on the big set.
  Conditioning on ``correct`` is what makes it unbiased: robust accuracy is
  E[correct · 1(robust)] = E[correct · P(robust | s, correct)], and correctness is observed on
  the big set. A curve fitted on all subset points estimates P(robust | s) instead, which mixes
  in misclassified points (whose label-free margins follow another law) and is biased unless
  robustness and correctness are independent given the score.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.optimize import isotonic_regression

from marginwatch.artifact.flags import brittle, brittle_counts
from marginwatch.artifact.schema import Curve, EstimateMethod, RobustAccuracyEstimate
from marginwatch.calibration.progress import Advance, ignore

__all__ = [
    "IsotonicCurve",
    "NotFittedError",
    "count_estimate",
    "estimate_robust_accuracy",
    "fit_isotonic_curve",
    "fit_live_curve",
    "fit_robust_curve",
    "regression_estimate",
]


class NotFittedError(ValueError):
    """A calibrator was used before ``fit`` (scikit-learn's contract)."""


def _floats(name: str, a: np.ndarray) -> np.ndarray:
    out = np.asarray(a, dtype=np.float64)
    if out.ndim != 1 or not np.all(np.isfinite(out)):
        raise ValueError(f"{name} must be a 1-d array of finite floats")
    return out


def _bools(name: str, a: np.ndarray, size: int) -> np.ndarray:
    out = np.asarray(a)
    if out.dtype != np.bool_ or out.shape != (size,):
        raise ValueError(f"{name} must be a boolean array of length {size}, got {out.shape}")
    return out


def _probability(value: float) -> float:
    """A fraction computed in floats, clipped into [0, 1]: rounding may leave it a hair
    outside, and the schema's bounds would reject the whole record for that."""
    return float(np.clip(value, 0.0, 1.0))


def _pool_blocks(
    first: np.ndarray, last: np.ndarray, value: np.ndarray, weight: np.ndarray, groups: int
) -> tuple[np.ndarray, ...]:
    """Merge consecutive blocks into at most ``groups`` groups of about equal weight.

    A group's value is the weighted mean of its blocks' values: means of consecutive runs of a
    non-decreasing sequence are non-decreasing, so the curve stays monotone, and the weighted
    mean of the fitted values over the training points (= mean of y) is preserved.
    """
    centre = np.cumsum(weight) - weight / 2.0
    gid = np.minimum((centre * groups / weight.sum()).astype(np.int64), groups - 1)
    starts = np.r_[0, np.flatnonzero(np.diff(gid)) + 1]
    ends = np.r_[starts[1:], gid.size] - 1
    w = np.add.reduceat(weight, starts)
    v = np.add.reduceat(value * weight, starts) / w
    return first[starts], last[ends], v, w


def fit_isotonic_curve(x: np.ndarray, y: np.ndarray, *, max_knots: int = 200) -> Curve:
    """The increasing isotonic fit of ``y`` on ``x``, as a `Curve` (evaluated by ``np.interp``).

    Tied x are averaged first (weight = count), then scipy's PAVA runs on the averages. Each
    constant block of the step fit becomes two knots (its first and last x) so that
    ``np.interp`` is exact on every training x and linear between blocks. Adjacent blocks of
    equal value are merged (lossless). If more than ``max_knots // 2`` blocks remain, blocks
    are pooled into that many groups of about equal weight (see :func:`_pool_blocks`), so at
    most ``max_knots`` knots reach the artifact.
    """
    if max_knots < 2:
        raise ValueError(f"max_knots must be >= 2, got {max_knots}")
    xs = _floats("x", x)
    ys = _floats("y", np.asarray(y, dtype=np.float64))
    if xs.size == 0 or ys.shape != xs.shape:
        raise ValueError(f"x and y must be non-empty and of equal length: {xs.shape}, {ys.shape}")
    ux, inv, counts = np.unique(xs, return_inverse=True, return_counts=True)
    means = np.bincount(inv, weights=ys) / counts
    fit = isotonic_regression(means, weights=counts.astype(np.float64), increasing=True)
    starts = fit.blocks[:-1]
    value = fit.x[starts]
    keep = np.r_[True, np.diff(value) > 0]  # drop boundaries between equal-valued blocks
    starts = starts[keep]
    ends = np.r_[starts[1:], ux.size] - 1
    weight = np.add.reduceat(counts.astype(np.float64), starts)
    first, last, value = ux[starts], ux[ends], value[keep]
    if value.size > max_knots // 2:
        first, last, value, weight = _pool_blocks(first, last, value, weight, max_knots // 2)
    knots_x = np.column_stack([first, last]).ravel()
    knots_y = np.repeat(value, 2)
    distinct = np.r_[True, np.diff(knots_x) > 0]  # a one-point block needs a single knot
    return Curve(
        knots_x=knots_x[distinct].tolist(),
        knots_y=np.clip(knots_y[distinct], 0.0, 1.0).tolist(),
    )


class IsotonicCurve:
    """:func:`fit_isotonic_curve` behind scikit-learn's estimator contract, for code that
    wants a calibrator object: the fitted `Curve` is ``curve_``."""

    def __init__(self, max_knots: int = 200) -> None:
        self.max_knots = max_knots

    def fit(self, x: np.ndarray, y: np.ndarray) -> IsotonicCurve:
        """Fit on scores ``x`` and 0/1 (or [0, 1]) targets ``y``; returns self."""
        self.curve_ = fit_isotonic_curve(x, y, max_knots=self.max_knots)
        return self

    def predict(self, s: np.ndarray) -> np.ndarray:
        """Curve value at scores ``s`` (any shape), in [0, 1]."""
        if not hasattr(self, "curve_"):
            raise NotFittedError("IsotonicCurve is not fitted; call fit() first")
        return self.curve_(np.asarray(s, dtype=np.float64))


def fit_robust_curve(
    subset_scores: np.ndarray,
    subset_correct: np.ndarray,
    subset_robust: np.ndarray,
    *,
    max_knots: int = 200,
) -> Curve:
    """r(s) = P(robust | score = s, correct), fitted on the correctly classified points only.

    See the module docstring for why the conditioning on ``correct`` is needed.
    """
    s = _floats("subset_scores", subset_scores)
    correct = _bools("subset_correct", subset_correct, s.size)
    robust = _bools("subset_robust", subset_robust, s.size)
    if not np.any(correct):
        raise ValueError("no correctly classified point to fit P(robust | score, correct) on")
    return fit_isotonic_curve(s[correct], robust[correct], max_knots=max_knots)


def fit_live_curve(
    subset_scores: np.ndarray,
    subset_correct: np.ndarray,
    subset_robust: np.ndarray,
    *,
    max_knots: int = 200,
) -> Curve:
    """g(s) = P(correct and robust | score = s), fitted on every subset point.

    Served traffic has no labels, so the service can only average a function of the score:
    the mean of g over a window of requests estimates that traffic's robust accuracy (valid
    while P(correct, robust | s) is what it was on the subset).
    """
    s = _floats("subset_scores", subset_scores)
    correct = _bools("subset_correct", subset_correct, s.size)
    robust = _bools("subset_robust", subset_robust, s.size)
    return fit_isotonic_curve(s, correct & robust, max_knots=max_knots)


def count_estimate(correct_big: np.ndarray, scores_big: np.ndarray, threshold: float) -> float:
    """The paper's estimator: fraction of big-set points that are correct and not flagged."""
    s = _floats("scores_big", scores_big)
    correct = _bools("correct_big", correct_big, s.size)
    return float(np.mean(correct & ~brittle(s, threshold)))


def regression_estimate(correct_big: np.ndarray, scores_big: np.ndarray, curve_r: Curve) -> float:
    """mean(correct · r(score)) on the big set, r from :func:`fit_robust_curve`."""
    s = _floats("scores_big", scores_big)
    correct = _bools("correct_big", correct_big, s.size)
    return float(np.sum(curve_r(s[correct])) / s.size)


def _bootstrap_count(
    sub_s: np.ndarray,
    sub_nonrobust: np.ndarray,
    big_correct_scores: np.ndarray,
    *,
    n_big: int,
    rule: Callable[[np.ndarray, np.ndarray], float],
    draws: int,
    rng: np.random.Generator,
    advance: Advance,
) -> np.ndarray:
    """Count estimates over ``draws`` joint resamples of the subset (refitting λ) and big set.

    Resampling the big set is exact and free here: given λ, the number of resampled points that
    are correct and not brittle is Binomial(n_big, p(λ)), p(λ) the big set's own fraction.
    """
    n = sub_s.size
    idx = rng.integers(0, n, size=(draws, n))
    thresholds = np.empty(draws)
    for b, i in enumerate(idx):
        thresholds[b] = rule(sub_s[i], sub_nonrobust[i])
        advance(1)
    p = (big_correct_scores.size - brittle_counts(big_correct_scores, thresholds)) / n_big
    return rng.binomial(n_big, p) / n_big


def _bootstrap_regression(
    sub_s: np.ndarray,
    sub_correct: np.ndarray,
    sub_robust: np.ndarray,
    big_correct_scores: np.ndarray,
    *,
    n_big: int,
    draws: int,
    rng: np.random.Generator,
    advance: Advance,
) -> np.ndarray:
    """Regression estimates over ``draws`` joint resamples of the subset (refitting r) and big set.

    A big-set resample holds Binomial(n_big, accuracy) correct points, drawn uniformly from the
    correct ones; only they contribute, so we draw just those (same law, fewer draws). A subset
    resample without a correct point leaves r undefined (as the point estimate would be) and is
    drawn again: the interval is conditional on at least one, likely only for a subset with
    very few correct points (the caller refuses a subset with none).
    """
    n = sub_s.size
    n_c = big_correct_scores.size
    if not sub_correct.any():
        raise ValueError("the subset has no correctly classified point to resample")
    out = np.empty(draws)
    for b in range(draws):
        i = rng.integers(0, n, size=n)
        while not sub_correct[i].any():
            i = rng.integers(0, n, size=n)
        i = i[sub_correct[i]]
        curve = fit_isotonic_curve(sub_s[i], sub_robust[i])
        j = rng.integers(0, n_c, size=rng.binomial(n_big, n_c / n_big))
        out[b] = np.sum(curve(big_correct_scores[j])) / n_big
        advance(1)
    return out


def estimate_robust_accuracy(
    subset_scores: np.ndarray,
    subset_correct: np.ndarray,
    subset_robust: np.ndarray,
    big_scores: np.ndarray,
    big_correct: np.ndarray,
    *,
    threshold_rule: Callable[[np.ndarray, np.ndarray], float],
    method: EstimateMethod,
    bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    advance: Advance = ignore,
) -> RobustAccuracyEstimate:
    """Robust accuracy of the big set with a percentile-bootstrap confidence interval.

    ``subset_robust`` is ``margin > eps`` (label-free; see the module docstring). The
    ``threshold_rule`` (``(scores, nonrobust) -> λ``, e.g. from
    ``threshold.make_threshold_rule``) is used by ``"count"`` only; it is required
    anyway so that switching methods never changes which rule an artifact records.
    Each bootstrap draw resamples the attacked subset and refits λ or r (the dominant source of
    variance), and resamples the big set. ``bootstrap=0`` skips the interval (no bounds).
    ``advance`` hears of each resample done (a progress bar's; see `calibration.progress`).
    """
    sub_s = _floats("subset_scores", subset_scores)
    sub_c = _bools("subset_correct", subset_correct, sub_s.size)
    sub_r = _bools("subset_robust", subset_robust, sub_s.size)
    big_s = _floats("big_scores", big_scores)
    big_c = _bools("big_correct", big_correct, big_s.size)
    if sub_s.size == 0 or big_s.size == 0:
        raise ValueError("the subset and the big set must be non-empty")
    if bootstrap < 0 or not 0.0 < confidence < 1.0:
        raise ValueError("bootstrap must be >= 0 and confidence in (0, 1)")
    rng = np.random.default_rng(seed)
    if method == "count":
        point = count_estimate(big_c, big_s, threshold_rule(sub_s, ~sub_r))
        draws = _bootstrap_count(
            sub_s,
            ~sub_r,
            big_s[big_c],
            n_big=big_s.size,
            rule=threshold_rule,
            draws=bootstrap,
            rng=rng,
            advance=advance,
        )
    elif method == "regression":
        point = regression_estimate(big_c, big_s, fit_robust_curve(sub_s, sub_c, sub_r))
        draws = _bootstrap_regression(
            sub_s,
            sub_c,
            sub_r,
            big_s[big_c],
            n_big=big_s.size,
            draws=bootstrap,
            rng=rng,
            advance=advance,
        )
    else:
        raise ValueError(f"method must be 'count' or 'regression', got {method!r}")
    low = high = None
    if bootstrap > 0:
        alpha = (1.0 - confidence) / 2.0
        low, high = (_probability(q) for q in np.quantile(draws, [alpha, 1.0 - alpha]))
    return RobustAccuracyEstimate(
        method=method,
        estimate=_probability(point),
        ci_low=low,
        ci_high=high,
        bootstrap=bootstrap,
    )
