"""What a candidate score buys, measured on the attacked subset, and the rule that decides
whether the learned one is worth its cost (issue 10). `score_choice` builds the candidates and
the serving graph; this module holds the figures and the decision, torch-free, so that the rule
reads in one place and is tested on figures alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from marginwatch.artifact.flags import brittle
from marginwatch.artifact.schema import ScoreChoice, ScoreFigures
from marginwatch.calibration.estimators import estimate_robust_accuracy
from marginwatch.calibration.metrics import detection_metrics, kendall_tau
from marginwatch.calibration.progress import Advance, ignore
from marginwatch.calibration.threshold import ThresholdRule

MIN_AUROC_GAIN = 0.005
"""Half a point of AUROC: below it, the subset's sampling noise (500 points) hides the gain."""
MIN_TAU_GAIN = 0.05
MIN_SPREAD_GAIN = 0.05
"""Relative narrowing of the estimate's bootstrap interval worth a learned score."""


@dataclass(frozen=True)
class ScoreSample:
    """One candidate's scores on the subset, on the big set and, when measured, on first-flip
    points."""

    name: str
    subset: np.ndarray
    big: np.ndarray
    boundary: np.ndarray | None
    multiply_adds: int


def measure(
    sample: ScoreSample,
    *,
    margins: np.ndarray,
    nonrobust: np.ndarray,
    correct: np.ndarray,
    big_correct: np.ndarray,
    rule: ThresholdRule,
    bootstrap: int,
    seed: int,
    advance: Advance = ignore,
) -> ScoreFigures:
    """τ, AUROC and λ on the subset; the regression estimate of the big set's robust accuracy
    with the width of its bootstrap interval (the spread a subset of this size leaves); the
    boundary recall at λ. `advance` hears of each bootstrap resample done."""
    threshold = rule(sample.subset, nonrobust)
    estimate = estimate_robust_accuracy(
        sample.subset,
        correct,
        ~nonrobust,
        sample.big,
        big_correct,
        threshold_rule=rule,
        method="regression",
        bootstrap=bootstrap,
        seed=seed,
        advance=advance,
    )
    spread = float("nan")
    if estimate.ci_low is not None and estimate.ci_high is not None:
        spread = estimate.ci_high - estimate.ci_low
    recall = None
    if sample.boundary is not None and sample.boundary.size:
        recall = float(np.mean(brittle(sample.boundary, threshold)))
    return ScoreFigures(
        name=sample.name,
        kendall_tau=kendall_tau(margins, sample.subset),
        auroc=detection_metrics(nonrobust, sample.subset).auroc,
        threshold=float(threshold),
        estimate=estimate.estimate,
        estimate_spread=spread,
        boundary_recall=recall,
        boundary_points=None if sample.boundary is None else int(sample.boundary.size),
        multiply_adds=sample.multiply_adds,
    )


def decide(logit: ScoreFigures, learned: ScoreFigures, *, forced: bool) -> ScoreChoice:
    """Serve the learned score when it buys more than noise on at least one count (τ, AUROC,
    estimate spread) and does not lose boundary recall; else the free logit margin."""
    gains = []
    if learned.auroc - logit.auroc >= MIN_AUROC_GAIN:
        gains.append(f"AUROC {logit.auroc:.3f} → {learned.auroc:.3f}")
    if learned.kendall_tau - logit.kendall_tau >= MIN_TAU_GAIN:
        gains.append(f"τ {logit.kendall_tau:.3f} → {learned.kendall_tau:.3f}")
    if learned.estimate_spread <= (1 - MIN_SPREAD_GAIN) * logit.estimate_spread:
        gains.append(
            f"estimate interval {100 * logit.estimate_spread:.2f} → "
            f"{100 * learned.estimate_spread:.2f} points wide"
        )
    losses = []
    if (
        logit.boundary_recall is not None
        and learned.boundary_recall is not None
        and learned.boundary_recall < logit.boundary_recall - 0.01
    ):
        losses.append(
            f"boundary recall {logit.boundary_recall:.3f} → {learned.boundary_recall:.3f}"
        )
    cost = f"cost {learned.multiply_adds:,} multiply-adds per request"
    if forced:
        chosen, reason = learned.name, f"forced (--pseudo-margin always); {cost}"
    elif gains and not losses:
        chosen, reason = learned.name, f"buys {'; '.join(gains)}; {cost}"
    else:
        bought = "; ".join(gains) if gains else "no gain above noise"
        lost = f", loses {'; '.join(losses)}" if losses else ""
        chosen, reason = logit.name, f"learned score: {bought}{lost}; not worth its {cost}"
    return ScoreChoice(
        candidates=[logit, learned],
        chosen=chosen,
        reason=reason,
        min_auroc_gain=MIN_AUROC_GAIN,
        min_tau_gain=MIN_TAU_GAIN,
        min_spread_gain=MIN_SPREAD_GAIN,
    )
