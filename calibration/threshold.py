"""Choosing λ on the attacked subset; a decision is brittle iff score < λ (`artifact.flags`,
the one rule the service flags with and every figure here counts with).

Both rules return the midpoint of the open interval of λ values that produce the chosen flag set
on the subset (between two consecutive distinct scores), the usual max-margin choice: it keeps
the subset's flags unchanged under small score noise on either side, and it makes the two rules
return the same λ whenever they select the same flags. Which rule, with which parameter, is the
artifact's `ThresholdRuleSpec`; :func:`make_threshold_rule` turns one into the function. Pure
numpy, importable by the service.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
from pydantic import TypeAdapter

from marginwatch.artifact.flags import brittle
from marginwatch.artifact.schema import TargetTpr, ThresholdRuleName, ThresholdRuleSpec

__all__ = [
    "THRESHOLD_RULES",
    "ThresholdRule",
    "checked_scores",
    "flag_rates",
    "make_threshold_rule",
    "threshold_at_tpr",
    "threshold_matching_fraction",
]

_TARGET_TPR: TypeAdapter[float] = TypeAdapter(TargetTpr)

ThresholdRule = Callable[[np.ndarray, np.ndarray], float]
"""``rule(scores, nonrobust) -> λ``, the shape the estimators refit on every bootstrap draw."""


def checked_scores(
    scores: np.ndarray, nonrobust: np.ndarray, *, allow_empty: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """``(scores as float64, nonrobust)``, after checking them as the threshold rules and the
    detection metrics (`metrics`) need: two 1-d arrays of equal length (non-empty unless
    `allow_empty`), boolean ``nonrobust``, finite scores. Errors here beat silent nan results."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(nonrobust)
    if s.ndim != 1 or s.shape != y.shape or (s.size == 0 and not allow_empty):
        size = "" if allow_empty else "non-empty "
        raise ValueError(
            f"expected scores and nonrobust as two {size}1-d arrays of equal length, "
            f"got {s.shape} and {y.shape}"
        )
    if y.dtype != np.bool_:
        raise ValueError(f"nonrobust must be a boolean array, got dtype {y.dtype}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    return s, y


def _lambda_flagging_k(sorted_scores: np.ndarray, k: int) -> float:
    """λ that flags (`brittle`) the ``k`` smallest scores: midpoint of s_(k) and s_(k+1).

    ``k = 0`` gives s_(1) (nothing flagged); ``k = n`` gives the next float above s_(n)
    (everything flagged; there is no upper order statistic to take a midpoint with). With a tie
    across the cut, the midpoint equals the tied value and the tied points stay unflagged, so
    ties round the flagged count *down*.
    """
    n = sorted_scores.size
    if k <= 0:
        return float(sorted_scores[0])
    if k >= n:
        return float(np.nextafter(sorted_scores[-1], np.inf))
    lo, hi = float(sorted_scores[k - 1]), float(sorted_scores[k])
    mid = lo + (hi - lo) / 2.0
    return mid if mid > lo else hi  # adjacent floats: the midpoint may round down onto lo


def threshold_matching_fraction(scores: np.ndarray, nonrobust: np.ndarray) -> float:
    """λ whose flagged fraction on the subset equals the subset's non-robust fraction.

    The paper's default rule: with k non-robust points among n, λ sits midway between the k-th
    and (k+1)-th smallest scores, so exactly k points score below it (fewer if tied at the cut).
    """
    s, y = checked_scores(scores, nonrobust)
    return _lambda_flagging_k(np.sort(s), int(y.sum()))


def threshold_at_tpr(scores: np.ndarray, nonrobust: np.ndarray, target_tpr: float) -> float:
    """The least-flagging λ whose TPR (non-robust points with score < λ) is >= ``target_tpr``.

    With P non-robust points the TPR is reached once the m = ceil(target · P) lowest-scoring
    non-robust points are flagged; every λ in (p_(m), next distinct score above p_(m)] flags
    the same subset points, and we return that interval's midpoint (see the module docstring).
    With no non-robust point there is nothing to catch and λ = min(score) flags nothing; this
    keeps bootstrap resamples of a very robust subset well defined.
    """
    _TARGET_TPR.validate_python(target_tpr)  # (0, 1], the artifact's range; a ValueError
    s, y = checked_scores(scores, nonrobust)
    n_pos = int(y.sum())
    m = math.ceil(target_tpr * n_pos - 1e-9)
    if m <= 0:
        return float(np.min(s))
    p_m = np.sort(s[y])[m - 1]
    sorted_all = np.sort(s)
    return _lambda_flagging_k(sorted_all, int(np.searchsorted(sorted_all, p_m, side="right")))


THRESHOLD_RULES: dict[ThresholdRuleName, Callable[..., float]] = {
    "match-fraction": threshold_matching_fraction,
    "target-tpr": threshold_at_tpr,
}
"""Rule name (as written in the calibration artifact) → function; see make_threshold_rule."""


def make_threshold_rule(spec: ThresholdRuleSpec) -> ThresholdRule:
    """Bind the rule that ``spec`` names to its parameters: ``(scores, nonrobust) -> λ``.

    The spec has already checked that ``target_tpr`` is given exactly for ``target-tpr``, so a
    result-changing parameter is never silently defaulted or ignored here.
    """
    rule = THRESHOLD_RULES[spec.name]
    if spec.target_tpr is None:
        return rule
    return functools.partial(rule, target_tpr=spec.target_tpr)


def _ratio(num: int, den: int) -> float:
    return num / den if den > 0 else float("nan")


def flag_rates(scores: np.ndarray, nonrobust: np.ndarray, threshold: float) -> dict[str, float]:
    """Operating point of the served flag (`brittle`) at ``threshold``: tpr, fpr,
    flagged_fraction, precision; the vertex of `metrics.roc_curve` at that λ.

    A rate whose denominator is empty (no positives, no negatives, nothing flagged) is nan.
    """
    s, y = checked_scores(scores, nonrobust)
    is_brittle = brittle(s, threshold)
    tp = int(np.sum(is_brittle & y))
    fp = int(np.sum(is_brittle & ~y))
    n_pos = int(y.sum())
    return {
        "tpr": _ratio(tp, n_pos),
        "fpr": _ratio(fp, y.size - n_pos),
        "flagged_fraction": _ratio(tp + fp, y.size),
        "precision": _ratio(tp, tp + fp),
    }
