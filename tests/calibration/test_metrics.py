"""Detection and consistency metrics against hand-computed values and brute-force definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import kendalltau

from marginwatch.artifact.flags import brittle
from marginwatch.calibration.metrics import (
    detection_metrics,
    kendall_tau,
    nonrobust_mask,
    roc_curve,
)
from marginwatch.calibration.threshold import flag_rates

# Scores 1..4 with a tie at 2; positives (non-robust) score {1, 2, 3}, negatives {2, 4}.
HAND_Y = np.array([True, False, True, True, False])
HAND_S = np.array([1.0, 2.0, 2.0, 3.0, 4.0])


def brute_auroc(y: np.ndarray, s: np.ndarray) -> float:
    """P(score_neg > score_pos) + 0.5 P(tie) over all (positive, negative) pairs."""
    pos, neg = s[y][:, None], s[~y][None, :]
    return float(np.mean((neg > pos) + 0.5 * (neg == pos)))


def brute_rates(y: np.ndarray, s: np.ndarray) -> list[tuple[float, float, float]]:
    """(tpr, fpr, precision) flagging ``score <= t`` for each distinct t, increasing."""
    out = []
    for t in np.unique(s):
        flagged = s <= t
        tp = np.sum(flagged & y)
        out.append((tp / y.sum(), np.sum(flagged & ~y) / (~y).sum(), tp / flagged.sum()))
    return out


def brute_ap(y: np.ndarray, s: np.ndarray) -> float:
    total, prev_recall = 0.0, 0.0
    for recall, _, precision in brute_rates(y, s):
        total += (recall - prev_recall) * precision
        prev_recall = recall
    return total


def brute_fpr95(y: np.ndarray, s: np.ndarray) -> float:
    return min(fpr for tpr, fpr, _ in brute_rates(y, s) if tpr >= 0.95)


def test_hand_example() -> None:
    m = detection_metrics(HAND_Y, HAND_S)
    assert m.auroc == pytest.approx(4.5 / 6)  # 4 wins and 1 tie over 6 pairs
    assert m.aupr == pytest.approx(29 / 36)  # (1 + 2/3 + 3/4) / 3
    assert m.fpr_at_95_tpr == pytest.approx(0.5)  # all 3 positives need t = 3: 1 of 2 negatives
    assert (m.positives, m.negatives) == (3, 2)


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 80))
    y = rng.random(n) < rng.uniform(0.2, 0.8)
    s = rng.integers(0, 8, size=n).astype(float) + 1.5 * y * rng.random()  # ties, some signal
    y[:2] = [True, False]
    m = detection_metrics(y, s)
    assert m.auroc == pytest.approx(brute_auroc(y, s))
    assert m.aupr == pytest.approx(brute_ap(y, s))
    assert m.fpr_at_95_tpr == pytest.approx(brute_fpr95(y, s))


def test_invariant_to_monotone_transform() -> None:
    rng = np.random.default_rng(0)
    s = rng.normal(size=200)
    y = s + rng.normal(size=200) < 0
    a, b = detection_metrics(y, s), detection_metrics(y, np.exp(3 * s) + 7)
    assert a == b


@pytest.mark.parametrize("y", [np.zeros(5, bool), np.ones(5, bool), np.zeros(0, bool)])
def test_degenerate_classes_give_nan(y: np.ndarray) -> None:
    m = detection_metrics(y, np.arange(y.size, dtype=float))
    assert math.isnan(m.auroc) and math.isnan(m.aupr) and math.isnan(m.fpr_at_95_tpr)
    fpr, tpr, _ = roc_curve(y, np.arange(y.size, dtype=float))
    assert fpr.shape == tpr.shape


def test_roc_curve_shape_and_consistency_with_flag_rates() -> None:
    fpr, tpr, thr = roc_curve(HAND_Y, HAND_S)
    np.testing.assert_allclose(tpr, [0, 1 / 3, 2 / 3, 1, 1])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_array_equal(thr, [1.0, 2.0, 3.0, 4.0, np.inf])
    # each vertex is the served flag at its own λ, exactly: no nudging past a tie
    for f, t, th in zip(fpr, tpr, thr, strict=True):
        rates = flag_rates(HAND_S, HAND_Y, float(th))
        assert (rates["fpr"], rates["tpr"]) == (f, t)


@pytest.mark.parametrize("seed", range(4))
def test_roc_vertices_count_what_the_service_flags(seed: int) -> None:
    """At each ROC λ, tp and fp are the counts of `flags.brittle` (score < λ): tied scores,
    float32 scores and a λ equal to a score included."""
    rng = np.random.default_rng(seed)
    s = rng.integers(0, 6, size=50).astype(np.float32) / np.float32(3)  # ties, inexact in float32
    y = rng.random(50) < 0.4
    fpr, tpr, thr = roc_curve(y, s)
    for f, t, threshold in zip(fpr, tpr, thr, strict=True):
        served = brittle(s, threshold)
        assert (int(np.sum(served & y)), int(np.sum(served & ~y))) == (
            round(t * y.sum()),
            round(f * (~y).sum()),
        )
    assert not brittle(s, thr[0]).any() and brittle(s, thr[-1]).all()


def test_the_lambda_operating_point_is_a_roc_vertex() -> None:
    """Whatever λ the rules fit (a midpoint, a tied value, above every score), its operating
    point lies on the ROC the report draws."""
    fpr, tpr, _ = roc_curve(HAND_Y, HAND_S)
    for threshold in (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, float(np.nextafter(4.0, np.inf)), 9.0):
        rates = flag_rates(HAND_S, HAND_Y, threshold)
        assert any((rates["fpr"], rates["tpr"]) == (f, t) for f, t in zip(fpr, tpr, strict=True))


@pytest.mark.parametrize(
    ("labels", "scores"),
    [
        (np.array([1, 0]), np.array([0.0, 1.0])),  # not boolean
        (np.array([True, False]), np.array([0.0, np.nan])),
        (np.array([True, False]), np.array([0.0, 1.0, 2.0])),
    ],
)
def test_rejects_bad_input(labels: np.ndarray, scores: np.ndarray) -> None:
    with pytest.raises(ValueError):
        detection_metrics(labels, scores)


def test_kendall_tau_basics() -> None:
    x = np.array([0.1, 0.3, 0.2, 0.5])
    assert kendall_tau(x, 2 * x + 1) == pytest.approx(1.0)
    assert kendall_tau(x, -x) == pytest.approx(-1.0)
    assert math.isnan(kendall_tau(np.ones(4), x))
    assert math.isnan(kendall_tau(x[:1], x[:1]))


def test_kendall_tau_ranks_censored_inf_highest() -> None:
    rng = np.random.default_rng(3)
    d = rng.random(50)
    s = d + 0.3 * rng.normal(size=50)
    d_cens = d.copy()
    d_cens[np.argmax(d)] = np.inf  # the largest margin censored: same ranks
    assert kendall_tau(d_cens, s) == pytest.approx(kendalltau(d, s).statistic)
    top = np.argsort(d)[-5:]
    d_cens[top] = np.inf  # five censored: one tied group above every finite margin
    d_tied = np.where(np.isinf(d_cens), 99.0, d_cens)
    assert kendall_tau(d_cens, s) == pytest.approx(kendalltau(d_tied, s).statistic)


def test_nonrobust_mask_handles_censoring() -> None:
    d = np.array([0.05, 0.2, np.inf, 0.3])
    ok = np.array([True, True, False, False])
    np.testing.assert_array_equal(nonrobust_mask(d, ok, 0.1), [True, False, False, False])
    with pytest.raises(ValueError, match="censored"):
        nonrobust_mask(np.array([0.05]), np.array([False]), 0.1)
