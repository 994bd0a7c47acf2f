"""Consistency and detection metrics: how well a score ranks and separates brittle decisions.

Pure numpy/scipy (no torch, no scikit-learn) so that the service and the report can import it.

Conventions, shared with `threshold` and `estimators`:

* ``scores``: the detector's margin-like score s(x) (logit margin or pseudo-margin); LARGER means
  more robust. The brittleness detector's output is therefore ``-score``.
* ``nonrobust``: the positive class of the detection task, ``input margin <= eps`` with the
  margin measured against the *predicted* label (label-free). Misclassification plays no part in
  detection; it only enters robust accuracy. :func:`nonrobust_mask` builds it from attack output.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import kendalltau

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
    """Cumulative (tp, fp) counts at each distinct score, flagging ``score <= t``.

    Walking the scores upwards is walking the detector output ``-score`` downwards; tied scores
    form one threshold so that ties contribute a diagonal ROC segment (the 0.5 tie credit).
    """
    if scores.size == 0:
        empty = np.zeros(0)
        return empty, empty, empty
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    y = nonrobust[order]
    last_of_group = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tps = np.cumsum(y)[last_of_group]
    fps = (last_of_group + 1) - tps
    return tps.astype(np.float64), fps.astype(np.float64), s[last_of_group]


def roc_curve(
    nonrobust: np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC of the detector ``-score`` for the positive class ``nonrobust``.

    Returns ``(fpr, tpr, thresholds)`` with thresholds in *score* units, increasing: point ``i``
    flags ``score <= thresholds[i]``. The first point is ``(0, 0)`` at ``-inf`` (nothing
    flagged). With no positives (or no negatives) tpr (or fpr) is all nan.
    """
    s, y = checked_scores(scores, nonrobust, allow_empty=True)
    tps, fps, thr = _roc_counts(y, s)
    tps, fps = np.r_[0.0, tps], np.r_[0.0, fps]
    n_pos, n_neg = tps[-1], fps[-1]
    tpr = tps / n_pos if n_pos > 0 else np.full(tps.shape, np.nan)
    fpr = fps / n_neg if n_neg > 0 else np.full(fps.shape, np.nan)
    return fpr, tpr, np.r_[-np.inf, thr]


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
    * FPR@95: the FPR at the first threshold (walking the detector output down) whose TPR
      reaches 0.95, i.e. the least FPR achieving TPR >= 0.95.

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
    tpr = np.r_[0.0, tps / n_pos]
    fpr = np.r_[0.0, fps / n_neg]
    auroc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))
    precision = tps / (tps + fps)  # every group holds >= 1 point, so no 0/0
    aupr = float(np.sum(np.diff(tpr) * precision))
    reach = np.flatnonzero(tps >= 0.95 * n_pos - 1e-9 * n_pos)[0]
    return DetectionMetrics(
        auroc=auroc,
        aupr=aupr,
        fpr_at_95_tpr=float(fps[reach] / n_neg),
        positives=n_pos,
        negatives=n_neg,
    )
