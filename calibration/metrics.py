"""Consistency and detection metrics: how well a score ranks and separates brittle decisions.

Pure numpy/scipy (no torch, no scikit-learn) so that the service and the report can import it.

Conventions, `artifact.flags`'s (shared with `threshold`, `estimators` and the service):

* ``scores``: the detector's margin-like score s(x) (logit margin or pseudo-margin); LARGER means
  more robust. The brittleness detector's output is therefore ``-score``, and the ROC's
  operating point at λ flags exactly what the service flags, ``flags.brittle``: score < λ.
* ``nonrobust``: the positive class of the detection task, ``input margin <= eps`` with the
  margin measured against the *predicted* label (label-free). Misclassification plays no part in
  detection; it only enters robust accuracy. :func:`nonrobust_mask` builds it from attack output.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import kendalltau

from marginwatch.artifact.flags import brittle_counts, operating_thresholds
from marginwatch.calibration.threshold import checked_scores

__all__ = [
    "DetectionMetrics",
    "detection_metrics",
    "kendall_tau",
    "nonrobust_mask",
    "roc_curve",
]


def nonrobust_mask(margins: np.ndarray, success: np.ndarray, eps: float) -> np.ndarray:
    """Return ``margin <= eps`` with censored margins handled explicitly.

    Where every attack failed (``success`` False) the radius is only a lower bound (possibly
    ``inf``): such a point is robust at ``eps`` exactly when that bound exceeds ``eps``. A
    censored bound at or below ``eps`` leaves robustness unknown, and guessing either way would
    bias every metric downstream, so it raises instead.
    """
    d = np.asarray(margins, dtype=np.float64)
    ok = np.asarray(success, dtype=bool)
    if d.shape != ok.shape or d.ndim != 1:
        raise ValueError(f"margins {d.shape} and success {ok.shape} must be equal-length 1-d")
    if np.any(np.isnan(d)) or np.any(d < 0):
        raise ValueError("margins must be non-negative and not nan")
    unknown = ~ok & (d <= eps)
    if np.any(unknown):
        raise ValueError(
            f"{int(unknown.sum())} censored margin(s) have a lower bound <= eps={eps}: "
            "robustness unknown; rerun the attacks with a budget larger than eps"
        )
    return ok & (d <= eps)


def kendall_tau(margins: np.ndarray, scores: np.ndarray) -> float:
    """Kendall tau-b between input margins and scores: the paper's margin-consistency measure.

    tau-b is rank based, so a censored margin given as ``+inf`` (attack failed) simply ranks
    above every finite one; we replace ``inf`` by a finite value above the largest finite margin
    so the result does not depend on how a scipy version treats infinities. Returns nan (no
    warning) for fewer than two points or a constant input.
    """
    d = np.asarray(margins, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    if d.ndim != 1 or d.shape != s.shape:
        raise ValueError(f"expected two 1-d arrays of equal length, got {d.shape} and {s.shape}")
    if np.any(np.isnan(d)) or not np.all(np.isfinite(s)):
        raise ValueError("margins must not be nan and scores must be finite")
    if d.size < 2:
        return float("nan")
    finite = np.isfinite(d)
    if not np.all(finite):
        top = float(np.max(d[finite])) if np.any(finite) else 0.0
        d = np.where(finite, d, top + 1.0)
    return float(kendalltau(d, s, variant="b").statistic)


def _roc_counts(nonrobust: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, ...]:
    """(tp, fp) counts of the served flag at each of `flags.operating_thresholds`, with those λs.

    Walking λ upwards is walking the detector output ``-score`` downwards; tied scores cross
    one λ together, so that ties contribute a diagonal ROC segment (the 0.5 tie credit). The
    first λ (the smallest score) flags nothing; the counts are `brittle`'s, not a re-derivation.
    """
    thresholds = operating_thresholds(scores)
    tps = brittle_counts(scores[nonrobust], thresholds)
    fps = brittle_counts(scores[~nonrobust], thresholds)
    return tps.astype(np.float64), fps.astype(np.float64), thresholds


def roc_curve(
    nonrobust: np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC of the detector ``-score`` for the positive class ``nonrobust``.

    Returns ``(fpr, tpr, thresholds)`` with thresholds in *score* units, increasing: point ``i``
    is the served flag at λ = ``thresholds[i]`` (``score < thresholds[i]``, so
    `threshold.flag_rates` at that λ gives the same pair). The first point is ``(0, 0)`` at the
    smallest score (nothing flagged), the last ``(1, 1)`` at ``+inf``; with no scores the one
    point ``(0, 0)`` at ``+inf``. With no positives (or no negatives) tpr (or fpr) is all nan.
    """
    s, y = checked_scores(scores, nonrobust, allow_empty=True)
    tps, fps, thr = _roc_counts(y, s)
    n_pos, n_neg = tps[-1], fps[-1]
    tpr = tps / n_pos if n_pos > 0 else np.full(tps.shape, np.nan)
    fpr = fps / n_neg if n_neg > 0 else np.full(fps.shape, np.nan)
    return fpr, tpr, thr


@dataclass(frozen=True)
class DetectionMetrics:
    """Detection of non-robust points by ``-score``; nan where a class is missing."""

    auroc: float
    aupr: float
    fpr_at_95_tpr: float
    positives: int
    negatives: int


def detection_metrics(nonrobust: np.ndarray, scores: np.ndarray) -> DetectionMetrics:
    """AUROC, AUPR and FPR at 95 % TPR of ``-score`` for detecting ``nonrobust`` points.

    * AUROC: trapezoid on the ROC with tied scores grouped, which equals the Mann–Whitney
      statistic P(score_neg > score_pos) + 0.5 P(tie).
    * AUPR: average precision as scikit-learn defines it, sum_n (R_n - R_{n-1}) P_n over the
      grouped thresholds (no interpolation, so it is not optimistic).
    * FPR@95: the FPR at the least λ (the first threshold, walking the detector output down)
      whose TPR reaches 0.95, i.e. the least FPR the served flag achieves with TPR >= 0.95.

    Without positives or without negatives the three rates are nan (no warning): callers
    compute these on small resamples and subsets where that happens.
    """
    s, y = checked_scores(scores, nonrobust, allow_empty=True)
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        nan = float("nan")
        return DetectionMetrics(nan, nan, nan, positives=n_pos, negatives=n_neg)
    tps, fps, _ = _roc_counts(y, s)
    tpr, fpr = tps / n_pos, fps / n_neg
    auroc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))
    # every λ after the first flags >= 1 point more than the one before, so no 0/0
    precision = tps[1:] / (tps[1:] + fps[1:])
    aupr = float(np.sum(np.diff(tpr) * precision))
    reach = np.flatnonzero(tps >= 0.95 * n_pos - 1e-9 * n_pos)[0]
    return DetectionMetrics(
        auroc=auroc,
        aupr=aupr,
        fpr_at_95_tpr=float(fps[reach] / n_neg),
        positives=n_pos,
        negatives=n_neg,
    )
