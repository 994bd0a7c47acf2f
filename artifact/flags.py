"""The flag rule, written once: which served decisions are brittle, which are borderline, and
the guarded score's math in numpy. The service flags with it per request; the calibration job
fits λ, counts, estimates and draws its ROC with it; so a published figure and a served flag
cannot disagree about a point, ties included.

Conventions:

* ``score``: the served margin-like score s(x); LARGER means more robust.
* **brittle** iff ``score < λ``, strictly: a point scoring exactly λ is not brittle.
* **borderline** iff ``|score − λ| ≤ guard band``: near enough to λ that the score's change
  between batch sizes could move it across.
* **detection**: the positive class is non-robust, the detector's output is ``−score``, and the
  operating point of λ flags exactly the points that `brittle` flags. An ROC built on
  `operating_thresholds` has one vertex per distinct flag set, each the λ that produces it, so
  the λ operating point is always a vertex, whatever the ties.
* Comparisons are made in float64: ONNX Runtime's float32 scores are exact in float64, as is
  the λ the rules fit (a midpoint between two scores, or the next float above the largest);
  comparing in float32 would round λ and could flip a point next to it.

Several λ per model: pass an array of λs (shape ``(k,)``) and get one flag column per λ.
Pure numpy, no torch: the service imports it.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "borderline",
    "brittle",
    "brittle_counts",
    "guarded_score_np",
    "operating_thresholds",
]


def _thresholds(threshold: float | ArrayLike) -> np.ndarray:
    """λ as float64: 0-d for one λ, 1-d for several."""
    thresholds = np.asarray(threshold, dtype=np.float64)
    if thresholds.ndim > 1:
        raise ValueError(
            f"threshold must be a scalar or a 1-d array of λs, got shape {thresholds.shape}"
        )
    return thresholds


def _against(scores: ArrayLike, thresholds: np.ndarray) -> np.ndarray:
    """Scores shaped to broadcast against λ: unchanged for one λ, a trailing axis for several."""
    s = np.asarray(scores)
    return s if thresholds.ndim == 0 else s[..., np.newaxis]


def brittle(scores: ArrayLike, threshold: float | ArrayLike) -> np.ndarray:
    """``score < λ``: the served flag. One λ gives the scores' shape; k λs give a trailing
    axis of k flag columns (``[i, j]``: score i at λ j)."""
    thresholds = _thresholds(threshold)
    # λ float64 and not a Python float: numpy would compare float32 scores in float32
    return _against(scores, thresholds) < thresholds


def borderline(scores: ArrayLike, threshold: float | ArrayLike, guard_band: float) -> np.ndarray:
    """``|score − λ| ≤ guard band``, shaped as `brittle`'s result."""
    thresholds = _thresholds(threshold)
    return np.abs(_against(scores, thresholds) - thresholds) <= guard_band


def brittle_counts(scores: ArrayLike, thresholds: ArrayLike) -> np.ndarray:
    """How many of ``scores`` are brittle at each λ of ``thresholds``: ``brittle(scores,
    thresholds).sum(0)`` without the n × k matrix (a sort and a binary search per λ)."""
    thresholds = _thresholds(thresholds)
    if np.any(np.isnan(thresholds)):
        raise ValueError("a threshold is nan: it flags nothing, which no count here can say")
    ordered = np.sort(np.asarray(scores, dtype=np.float64), axis=None)
    # side="left": the number of scores strictly below λ, i.e. brittle's count
    return np.searchsorted(ordered, thresholds, side="left")


def operating_thresholds(scores: ArrayLike) -> np.ndarray:
    """One λ per distinct flag set that `brittle` can give ``scores``, increasing: each distinct
    score (flagging every lower one; the smallest flags nothing), then ``+inf`` (everything)."""
    return np.r_[np.unique(np.asarray(scores, dtype=np.float64)), np.inf]


def guarded_score_np(pseudo: ArrayLike, logit_margin: ArrayLike, kappa: float) -> np.ndarray:
    """min(pseudo-margin, κ · logit margin), numpy's twin of `calibration.scores.guarded_score`
    (the exported graph's, in torch). Same operations in the same order and dtype, so float32
    inputs give the graph's values; tests/artifact/test_flags.py holds the two equal."""
    return np.minimum(pseudo, np.multiply(logit_margin, kappa))
