"""λ selection rules and the operating point they produce."""

from __future__ import annotations

import math
from typing import get_args

import numpy as np
import pytest

from marginwatch.artifact.flags import brittle
from marginwatch.artifact.schema import ThresholdRuleName, ThresholdRuleSpec
from marginwatch.calibration.threshold import (
    THRESHOLD_RULES,
    flag_rates,
    make_threshold_rule,
    threshold_at_tpr,
    threshold_matching_fraction,
)


def _data(seed: int, n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    s = rng.normal(size=n)
    return s, s + 0.7 * rng.normal(size=n) < -0.2


@pytest.mark.parametrize("seed", range(4))
def test_match_fraction_flags_exactly_the_nonrobust_count(seed: int) -> None:
    s, y = _data(seed)
    threshold = threshold_matching_fraction(s, y)
    assert np.sum(brittle(s, threshold)) == y.sum()
    srt = np.sort(s)
    k = int(y.sum())
    assert threshold == pytest.approx((srt[k - 1] + srt[k]) / 2)  # the documented midpoint


def test_match_fraction_edges_and_ties() -> None:
    s = np.array([0.0, 1.0, 1.0, 2.0])
    none, every = np.zeros(4, bool), np.ones(4, bool)
    assert np.sum(brittle(s, threshold_matching_fraction(s, none))) == 0
    assert np.sum(brittle(s, threshold_matching_fraction(s, every))) == 4
    two = np.array([True, True, False, False])  # the cut falls inside the tie at 1.0
    assert np.sum(brittle(s, threshold_matching_fraction(s, two))) == 1  # ties round down


@pytest.mark.parametrize("target", [0.5, 0.9, 0.95, 1.0])
def test_target_tpr_is_reached_minimally(target: float) -> None:
    s, y = _data(7)
    threshold = threshold_at_tpr(s, y, target)
    assert flag_rates(s, y, threshold)["tpr"] >= target
    below = s[
        brittle(s, threshold)
    ].max()  # the next smaller λ that changes the flags unflags this score
    assert flag_rates(s, y, float(below))["tpr"] < target


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_float32_scores_flag_k_points_at_their_lambda(k: int) -> None:
    """The service's scores are float32 and λ a float64 midpoint (or the float64 just above the
    largest score): the rule must flag k points on the float32 scores, as on their float64
    copies. Adjacent float32s leave no float32 between them, so a λ rounded to float32 would
    land on a score: comparing in float32 would miss a point at k = 1 and at k = 3."""
    one = np.float32(1.0)
    s = np.array([one, np.nextafter(one, np.float32(2)), np.float32(2.0)], dtype=np.float32)
    y = np.arange(3) < k
    threshold = threshold_matching_fraction(s, y)
    assert np.sum(brittle(s, threshold)) == np.sum(brittle(s.astype(np.float64), threshold)) == k
    assert flag_rates(s, y, threshold)["flagged_fraction"] == k / 3


def test_target_tpr_without_positives_flags_nothing() -> None:
    s = np.array([0.3, 0.1, 0.2])
    assert np.sum(brittle(s, threshold_at_tpr(s, np.zeros(3, bool), 0.95))) == 0


def test_rules_agree_when_they_select_the_same_flags() -> None:
    s = np.array([0.0, 1.0, 2.0, 3.0])
    y = np.array([True, True, False, False])  # perfectly separated: TPR 1 = match fraction
    assert threshold_at_tpr(s, y, 1.0) == threshold_matching_fraction(s, y) == 1.5


def test_flag_rates_hand_example() -> None:
    s = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    y = np.array([True, False, True, False, False])
    rates = flag_rates(s, y, 2.5)  # flags 0, 1, 2
    assert rates == pytest.approx(
        {"tpr": 1.0, "fpr": 1 / 3, "flagged_fraction": 0.6, "precision": 2 / 3}
    )
    empty = flag_rates(s, y, -1.0)
    assert math.isnan(empty["precision"]) and empty["flagged_fraction"] == 0.0


def test_rule_registry_and_binding() -> None:
    s, y = _data(1)
    assert set(THRESHOLD_RULES) == set(get_args(ThresholdRuleName))  # one list of names
    match = make_threshold_rule(ThresholdRuleSpec(name="match-fraction"))
    assert match(s, y) == threshold_matching_fraction(s, y)
    bound = make_threshold_rule(ThresholdRuleSpec(name="target-tpr", target_tpr=0.9))
    assert bound(s, y) == threshold_at_tpr(s, y, 0.9)
    assert bound(s, y) != match(s, y)  # the parameter reaches the rule


@pytest.mark.parametrize(
    ("scores", "nonrobust"),
    [
        (np.array([]), np.array([], dtype=bool)),
        (np.array([0.0, np.inf]), np.array([True, False])),
        (np.array([0.0, 1.0]), np.array([1, 0])),
    ],
)
def test_rejects_bad_input(scores: np.ndarray, nonrobust: np.ndarray) -> None:
    with pytest.raises(ValueError):
        threshold_matching_fraction(scores, nonrobust)
