"""Robust-accuracy estimators and the isotonic calibrator on synthetic data with known truth."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.optimize import isotonic_regression

from marginwatch.calibration.estimators import (
    IsotonicCurve,
    NotFittedError,
    count_estimate,
    estimate_robust_accuracy,
    fit_live_curve,
    fit_robust_curve,
    regression_estimate,
)
from marginwatch.calibration.threshold import make_threshold_rule

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray]


def synth(n: int, rng: np.random.Generator) -> Arrays:
    """(scores, correct, robust): robust = score + noise > t; P(correct) rises with the score."""
    s = rng.normal(size=n)
    robust = s + 0.5 * rng.normal(size=n) > -0.3
    correct = rng.random(n) < 1.0 / (1.0 + np.exp(-(1.5 + 1.5 * s)))
    return s, correct, robust


MATCH = make_threshold_rule("match-fraction")


@pytest.mark.parametrize("method", ["count", "regression"])
def test_estimators_close_to_truth(method: str) -> None:
    rng = np.random.default_rng(0)
    big_s, big_c, big_r = synth(10_000, rng)
    sub = synth(500, rng)
    est = estimate_robust_accuracy(
        *sub, big_s, big_c, threshold_rule=MATCH, method=method, bootstrap=200, seed=1
    )
    truth = float(np.mean(big_c & big_r))
    assert abs(est.estimate - truth) < 0.04
    assert est.ci_low <= est.estimate <= est.ci_high
    assert (est.method, est.bootstrap) == (method, 200)


def test_regression_interval_covers_truth() -> None:
    covered = 0
    for rep in range(40):
        rng = np.random.default_rng(100 + rep)
        big_s, big_c, big_r = synth(2_000, rng)
        est = estimate_robust_accuracy(
            *synth(500, rng),
            big_s,
            big_c,
            threshold_rule=MATCH,
            method="regression",
            bootstrap=100,
            seed=rep,
        )
        covered += est.ci_low <= np.mean(big_c & big_r) <= est.ci_high
    assert covered >= 34  # nominal 95 %: at least 85 % of 40


def test_bootstrap_zero_gives_point_estimate_only() -> None:
    rng = np.random.default_rng(2)
    s, c, r = synth(200, rng)
    est = estimate_robust_accuracy(s, c, r, s, c, threshold_rule=MATCH, method="count", bootstrap=0)
    assert np.isnan(est.ci_low) and np.isnan(est.ci_high)
    assert est.estimate == count_estimate(c, s, MATCH(s, ~r))


def test_estimate_is_seeded() -> None:
    s, c, r = synth(300, np.random.default_rng(4))
    kwargs = {"threshold_rule": MATCH, "method": "regression", "bootstrap": 50, "seed": 9}
    assert estimate_robust_accuracy(s, c, r, s, c, **kwargs) == estimate_robust_accuracy(
        s, c, r, s, c, **kwargs
    )


def test_count_and_regression_estimates_by_hand() -> None:
    s = np.array([0.0, 1.0, 2.0, 3.0])
    c = np.array([True, True, False, True])
    assert count_estimate(c, s, 1.0) == 0.5  # indices 1 and 3
    half = IsotonicCurve.from_dict({"knots_x": [0.0], "knots_y": [0.5]})
    assert regression_estimate(c, s, half) == pytest.approx(3 * 0.5 / 4)


def test_robust_curve_is_fitted_on_correct_points_only() -> None:
    rng = np.random.default_rng(5)
    s, c, r = synth(400, rng)
    r_wrong = r.copy()
    r_wrong[~c] = ~r[~c]  # changing misclassified points must not move r
    a, b = fit_robust_curve(s, c, r), fit_robust_curve(s, c, r_wrong)
    np.testing.assert_array_equal(a.predict(s), b.predict(s))
    np.testing.assert_array_equal(a.predict(s), IsotonicCurve().fit(s[c], r[c]).predict(s))
    live = fit_live_curve(s, c, r)
    np.testing.assert_array_equal(live.predict(s), IsotonicCurve().fit(s, c & r).predict(s))


def test_isotonic_exact_on_training_points_when_not_pooled() -> None:
    x = np.array([0.0, 1.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    y = np.array([0, 1, 0, 1, 0, 1, 1], dtype=float)
    curve = IsotonicCurve().fit(x, y)
    ux = np.unique(x)
    means = np.array([y[x == u].mean() for u in ux])
    counts = np.array([np.sum(x == u) for u in ux], dtype=float)
    expected = isotonic_regression(means, weights=counts).x
    np.testing.assert_allclose(curve.predict(ux), expected)
    assert curve.predict(np.array([-10.0]))[0] == expected[0]  # flat extrapolation
    assert curve.predict(np.array([10.0]))[0] == expected[-1]


def test_isotonic_monotone_bounded_and_small() -> None:
    rng = np.random.default_rng(6)
    x = rng.normal(size=20_000)
    y = (rng.random(20_000) < 1 / (1 + np.exp(-3 * x))).astype(float)
    curve = IsotonicCurve(max_knots=200).fit(x, y)
    assert curve.x_.size <= 200
    assert np.all(np.diff(curve.x_) > 0) and np.all(np.diff(curve.y_) >= 0)
    grid = np.linspace(-5, 5, 1001)
    pred = curve.predict(grid)
    assert np.all(np.diff(pred) >= 0) and pred.min() >= 0 and pred.max() <= 1
    assert curve.predict(x).mean() == pytest.approx(y.mean())  # pooling keeps the mean


def test_isotonic_fit_is_idempotent_and_round_trips() -> None:
    rng = np.random.default_rng(7)
    s, c, r = synth(500, rng)
    curve = IsotonicCurve().fit(s, c & r)
    first = curve.to_dict()
    assert curve.fit(s, c & r).to_dict() == first
    again = IsotonicCurve.from_dict(json.loads(json.dumps(first)))
    assert again.to_dict() == first
    grid = np.linspace(-4, 4, 97)
    np.testing.assert_array_equal(again.predict(grid), curve.predict(grid))
    served = np.interp(grid, first["knots_x"], first["knots_y"])  # what the service does
    np.testing.assert_array_equal(served, curve.predict(grid))


def test_not_fitted_error() -> None:
    assert issubclass(NotFittedError, ValueError)
    with pytest.raises(NotFittedError):
        IsotonicCurve().predict(np.zeros(2))
    with pytest.raises(NotFittedError):
        IsotonicCurve().to_dict()


@pytest.mark.parametrize(
    "bad",
    [
        {"knots_x": [1.0, 0.0], "knots_y": [0.1, 0.2]},
        {"knots_x": [0.0, 1.0], "knots_y": [0.3, 0.2]},
        {"knots_x": [0.0, 1.0], "knots_y": [0.3, 1.2]},
        {"knots_x": [], "knots_y": []},
    ],
)
def test_from_dict_validates(bad: dict[str, list[float]]) -> None:
    with pytest.raises(ValueError):
        IsotonicCurve.from_dict(bad)


def test_estimate_rejects_bad_arguments() -> None:
    s, c, r = synth(50, np.random.default_rng(8))
    with pytest.raises(ValueError):
        estimate_robust_accuracy(s, c, r, s, c, threshold_rule=MATCH, method="other")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        estimate_robust_accuracy(s, c.astype(int), r, s, c, threshold_rule=MATCH, method="count")
