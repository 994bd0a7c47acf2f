"""Robust-accuracy estimators and the isotonic calibrator on synthetic data with known truth."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import isotonic_regression

from marginwatch.artifact.schema import Curve, RobustAccuracyEstimate, ThresholdRuleSpec
from marginwatch.calibration.estimators import (
    IsotonicCurve,
    NotFittedError,
    count_estimate,
    estimate_robust_accuracy,
    fit_isotonic_curve,
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


MATCH = make_threshold_rule(ThresholdRuleSpec(name="match-fraction"))


@pytest.mark.parametrize("method", ["count", "regression"])
def test_estimators_close_to_truth(method: str) -> None:
    rng = np.random.default_rng(0)
    big_s, big_c, big_r = synth(10_000, rng)
    sub = synth(500, rng)
    est = estimate_robust_accuracy(
        *sub, big_s, big_c, threshold_rule=MATCH, method=method, bootstrap=200, seed=1
    )
    truth = float(np.mean(big_c & big_r))
    assert isinstance(est, RobustAccuracyEstimate)  # the artifact's type, written as is
    assert abs(est.estimate - truth) < 0.04
    assert est.ci_low is not None and est.ci_high is not None
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
        assert est.ci_low is not None and est.ci_high is not None
        covered += est.ci_low <= np.mean(big_c & big_r) <= est.ci_high
    assert covered >= 34  # nominal 95 %: at least 85 % of 40


def test_bootstrap_zero_gives_point_estimate_only() -> None:
    rng = np.random.default_rng(2)
    s, c, r = synth(200, rng)
    est = estimate_robust_accuracy(s, c, r, s, c, threshold_rule=MATCH, method="count", bootstrap=0)
    assert est.ci_low is None and est.ci_high is None and est.bootstrap == 0
    assert est.estimate == count_estimate(c, s, MATCH(s, ~r))


def test_estimate_is_seeded() -> None:
    s, c, r = synth(300, np.random.default_rng(4))
    kwargs = {"threshold_rule": MATCH, "method": "regression", "bootstrap": 50, "seed": 9}
    assert estimate_robust_accuracy(s, c, r, s, c, **kwargs) == estimate_robust_accuracy(
        s, c, r, s, c, **kwargs
    )


def test_regression_interval_with_a_single_correct_subset_point() -> None:
    """A resample of 40 points misses the one correct point about 36 % of the time: such a
    resample is drawn again (r is undefined on it), rather than ending the run."""
    s = np.linspace(-1.0, 1.0, 40)
    correct = np.zeros(40, dtype=bool)
    correct[20] = True
    robust = s > 0.0
    est = estimate_robust_accuracy(
        s, correct, robust, s, correct, threshold_rule=MATCH, method="regression", bootstrap=50
    )
    assert est.ci_low is not None and est.ci_high is not None
    assert 0.0 <= est.ci_low <= est.estimate <= est.ci_high <= 1.0
    with pytest.raises(ValueError, match="no correctly classified point"):
        estimate_robust_accuracy(s, ~np.ones(40, dtype=bool), robust, s, correct,
                                 threshold_rule=MATCH, method="regression")  # fmt: skip


def test_count_and_regression_estimates_by_hand() -> None:
    s = np.array([0.0, 1.0, 2.0, 3.0])
    c = np.array([True, True, False, True])
    assert count_estimate(c, s, 1.0) == 0.5  # indices 1 and 3
    half = Curve(knots_x=[0.0], knots_y=[0.5])
    assert regression_estimate(c, s, half) == pytest.approx(3 * 0.5 / 4)


def test_robust_curve_is_fitted_on_correct_points_only() -> None:
    rng = np.random.default_rng(5)
    s, c, r = synth(400, rng)
    r_wrong = r.copy()
    r_wrong[~c] = ~r[~c]  # changing misclassified points must not move r
    a, b = fit_robust_curve(s, c, r), fit_robust_curve(s, c, r_wrong)
    assert a == b
    assert a == fit_isotonic_curve(s[c], r[c])
    assert fit_live_curve(s, c, r) == fit_isotonic_curve(s, c & r)


def test_isotonic_exact_on_training_points_when_not_pooled() -> None:
    x = np.array([0.0, 1.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    y = np.array([0, 1, 0, 1, 0, 1, 1], dtype=float)
    curve = fit_isotonic_curve(x, y)
    ux = np.unique(x)
    means = np.array([y[x == u].mean() for u in ux])
    counts = np.array([np.sum(x == u) for u in ux], dtype=float)
    expected = isotonic_regression(means, weights=counts).x
    np.testing.assert_allclose(curve(ux), expected)
    assert curve(np.array([-10.0]))[0] == expected[0]  # flat extrapolation
    assert curve(np.array([10.0]))[0] == expected[-1]


def test_isotonic_monotone_bounded_and_small() -> None:
    rng = np.random.default_rng(6)
    x = rng.normal(size=20_000)
    y = (rng.random(20_000) < 1 / (1 + np.exp(-3 * x))).astype(float)
    curve = fit_isotonic_curve(x, y, max_knots=200)
    assert len(curve.knots_x) <= 200
    assert np.all(np.diff(curve.knots_x) > 0) and np.all(np.diff(curve.knots_y) >= 0)
    grid = np.linspace(-5, 5, 1001)
    pred = curve(grid)
    assert np.all(np.diff(pred) >= 0) and pred.min() >= 0 and pred.max() <= 1
    assert curve(x).mean() == pytest.approx(y.mean())  # pooling keeps the mean


def test_isotonic_fit_is_idempotent_and_round_trips_through_json() -> None:
    rng = np.random.default_rng(7)
    s, c, r = synth(500, rng)
    curve = fit_isotonic_curve(s, c & r)
    assert fit_isotonic_curve(s, c & r) == curve
    again = Curve.model_validate_json(curve.model_dump_json())  # as the artifact stores it
    assert again == curve
    grid = np.linspace(-4, 4, 97)
    np.testing.assert_array_equal(again(grid), curve(grid))
    served = np.interp(grid, curve.knots_x, curve.knots_y)  # what the service does
    np.testing.assert_array_equal(served, curve(grid))


def test_isotonic_estimator_wraps_the_fitted_curve() -> None:
    x = np.linspace(0, 1, 50)
    y = (x > 0.4).astype(float)
    with pytest.raises(NotFittedError):
        IsotonicCurve().predict(x)
    assert issubclass(NotFittedError, ValueError)
    fitted = IsotonicCurve(max_knots=10).fit(x, y)
    assert fitted.curve_ == fit_isotonic_curve(x, y, max_knots=10)
    np.testing.assert_array_equal(fitted.predict(x), fitted.curve_(x))


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"knots_x": [1.0, 0.0], "knots_y": [0.1, 0.2]}, "sorted"),
        ({"knots_x": [0.0, 1.0], "knots_y": [0.3, 0.2]}, "non-decreasing"),
        ({"knots_x": [0.0, 1.0], "knots_y": [0.3, 1.2]}, "less than or equal to 1"),
        ({"knots_x": [0.0, float("inf")], "knots_y": [0.3, 0.4]}, "finite"),
        ({"knots_x": [0.0], "knots_y": [0.3, 0.4]}, "differ in length"),
        ({"knots_x": [], "knots_y": []}, "at least 1 item"),
    ],
)
def test_curve_validates_its_knots(bad: dict[str, list[float]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Curve.model_validate(bad)


def test_estimate_rejects_bad_arguments() -> None:
    s, c, r = synth(50, np.random.default_rng(8))
    with pytest.raises(ValueError):
        estimate_robust_accuracy(s, c, r, s, c, threshold_rule=MATCH, method="other")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        estimate_robust_accuracy(s, c.astype(int), r, s, c, threshold_rule=MATCH, method="count")
