"""The robustness answers' fits: Kaplan–Meier quantiles, margin quantiles given the score,
p_robust's calibration error, and a budget's answers, on data whose truth is known."""

from __future__ import annotations

import numpy as np
import pytest

from marginwatch.artifact.schema import RobustAccuracyEstimate
from marginwatch.calibration.answers import (
    Margins,
    Subset,
    budget_answers,
    cross_fitted,
    expected_calibration_error,
    fit_margin_quantiles,
    interval_coverage,
    km_quantiles,
    quantile_levels,
)
from marginwatch.calibration.threshold import threshold_matching_fraction


def test_km_quantiles_without_censoring_are_the_empirical_ones() -> None:
    values = np.random.default_rng(0).exponential(size=301)
    levels = [0.1, 0.5, 0.9]
    expected = np.quantile(values, levels, method="inverted_cdf")
    np.testing.assert_array_equal(km_quantiles(values, np.ones(301, bool), levels), expected)


def test_km_quantiles_count_a_censored_margin_as_a_lower_bound() -> None:
    # S: 4/5 after 1, 3/5 after 2, (3 censored), 3/10 after 4, 0 after 5
    values = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    observed = np.array([True, True, False, True, True])
    np.testing.assert_array_equal(km_quantiles(values, observed, [0.1, 0.5, 0.9]), [1, 4, 5])
    # dropping the censored point would say 2: biased low
    assert np.quantile(values[observed], 0.5, method="inverted_cdf") == 2


def test_a_quantile_beyond_the_censored_tail_is_the_largest_bound() -> None:
    got = km_quantiles(np.array([1.0, 2.0, 3.0]), np.array([True, False, False]), [0.2, 0.5])
    np.testing.assert_array_equal(got, [1.0, 3.0])


def test_quantile_levels_are_round() -> None:
    assert quantile_levels(0.8) == [0.1, 0.5, 0.9]


def synthetic(size: int, seed: int) -> tuple[np.ndarray, Margins]:
    """Margins that grow with the score, with noise: r = 0.05 s + |N(0, 0.03)|."""
    rng = np.random.default_rng(seed)
    scores = rng.uniform(0, 4, size)
    radius = 0.05 * scores + np.abs(rng.normal(0, 0.03, size))
    return scores, Margins(radius, np.ones(size, bool))


def test_margin_quantiles_cover_held_out_points_at_their_level() -> None:
    scores, margins = synthetic(3000, seed=1)
    fitted = fit_margin_quantiles(scores, margins, interval=0.8)
    assert fitted.levels == [0.1, 0.5, 0.9]
    held_scores, held = synthetic(3000, seed=2)
    low, _, high = fitted(held_scores)
    coverage = np.mean((held.value >= low) & (held.value <= high))
    assert 0.75 <= coverage <= 0.85
    rows = np.asarray(fitted.knots_y)
    assert np.all(np.diff(rows, axis=1) >= 0) and np.all(np.diff(rows, axis=0) >= 0)


def test_cross_fitted_coverage_is_near_the_nominal_level() -> None:
    scores, margins = synthetic(1000, seed=3)
    checks = cross_fitted(scores, margins, eps=0.1, interval=0.8, seed=0)
    assert 0.72 <= interval_coverage(checks) <= 0.88
    assert checks.p_robust.shape == (1000,) and np.all(
        (checks.p_robust >= 0) & (checks.p_robust <= 1)
    )


def test_censored_points_raise_quantiles_instead_of_vanishing() -> None:
    scores, margins = synthetic(2000, seed=4)
    # censor the top third of the margins at a bound below their value
    top = margins.value > np.quantile(margins.value, 2 / 3)
    bounds = Margins(np.where(top, margins.value * 0.9, margins.value), ~top)
    dropped = fit_margin_quantiles(scores[~top], Margins(margins.value[~top], ~top[~top]), 0.8)
    kept = fit_margin_quantiles(scores, bounds, 0.8)
    high_score = np.array([3.9])
    assert kept(high_score)[1, 0] > dropped(high_score)[1, 0]


def test_expected_calibration_error() -> None:
    rng = np.random.default_rng(5)
    p = rng.uniform(size=20000)
    outcome = rng.uniform(size=20000) < p
    assert expected_calibration_error(p, outcome) < 0.02
    assert expected_calibration_error(
        np.full(1000, 0.9), np.arange(1000) % 2 == 0
    ) == pytest.approx(0.4)


def test_a_censored_bound_below_the_budget_is_refused() -> None:
    margins = Margins(np.array([0.05, 0.005]), np.array([False, True]))
    assert margins.robust(0.01).tolist() == [True, False]
    with pytest.raises(ValueError, match="censored"):
        margins.robust(0.1)


def test_budget_answers_fit_lambda_and_a_decreasing_robust_share() -> None:
    scores, margins = synthetic(400, seed=6)
    correct = np.ones(400, bool)
    subset = Subset(scores, correct, margins, scores, margins, scores, correct)
    estimate = RobustAccuracyEstimate(method="regression", estimate=0.5, ci_low=None, ci_high=None)
    answers = [
        budget_answers(
            eps,
            subset,
            threshold=threshold_matching_fraction(scores, ~margins.robust(eps)),
            estimate=estimate,
        )
        for eps in (0.05, 0.1, 0.2)
    ]
    thresholds = [a.threshold for a in answers]
    assert thresholds == sorted(thresholds) and thresholds[0] < thresholds[-1]
    probe = np.array([2.0])
    p = [a.p_robust(probe)[0] for a in answers]
    assert p[0] >= p[1] >= p[2] and p[0] > p[2]
    assert [a.subset_nonrobust for a in answers] == sorted(a.subset_nonrobust for a in answers)
    assert all(a.p_robust_ece is not None and a.p_robust_ece < 0.1 for a in answers)
