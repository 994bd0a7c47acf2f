"""Which score the served graph carries, decided by what it buys on held-out points against what
it costs on every request (issue 10; this replaced a cut-off "learn a pseudo-margin when τ < 0.6").

Two candidates, both measured on the attacked subset, which the pseudo-margin never sees:

* the logit margin m(x): free (one TopK and one MatMul after the logits);
* the guarded pseudo-margin min(g(x), κ·m(x)) (`scores.guarded_score`): the learned g ranks clean
  inputs better, and the minimum with the logit margin catches the inputs just past a decision
  boundary, where g can extrapolate to a large value (docs/benchmarks.md, "Boundary recall").
  κ = λ_g / (share · λ_m) with each λ fitted by the job's rule on its own score: the logit
  margin flags once it is below `share` of its own λ (GUARD_SHARE, 0.25, when g is trained also
  on attack-path points, `--pseudo-paths`; GUARD_SHARE_WITHOUT_PATHS, 1, when not: the best of
  each in bench/boundary_recall.py).

What a candidate buys: Kendall τ and AUROC on the subset, the width of the regression
estimate's bootstrap interval, and the recall of first-flip points (a fixed-step attack from the
subset's correctly classified points, `boundary_points.first_flip`) at the λ the job fits. The
learned score costs the MLP on every request and is served only when it buys more than noise:
see `score_figures.decide`, which also holds the measuring. Every figure and the reason go into
the record (`PseudoMarginFacts.choice`).

With fewer than `MIN_PSEUDO_TRAIN_POINTS` training points (small data: the subset took the split)
no pseudo-margin is learned: the logit margin is served, and `without_pseudo_margin` records why
(`--pseudo-margin always` is refused in preflight instead).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from marginwatch.artifact.flags import guarded_score_np
from marginwatch.artifact.schema import PseudoMarginFacts, ScoreChoice
from marginwatch.calibration.boundary_points import first_flip
from marginwatch.calibration.config import MIN_PSEUDO_TRAIN_POINTS, CalibrationConfig
from marginwatch.calibration.inputs import Inputs, Outputs, forward_all
from marginwatch.calibration.margins import MarginResult
from marginwatch.calibration.metrics import detection_metrics, kendall_tau, nonrobust_mask
from marginwatch.calibration.progress import phase
from marginwatch.calibration.pseudo_margin import PseudoMarginRegressor
from marginwatch.calibration.record import threshold_rule_spec
from marginwatch.calibration.score_figures import (
    MIN_AUROC_GAIN,
    MIN_SPREAD_GAIN,
    MIN_TAU_GAIN,
    ScoreSample,
    decide,
    measure,
)
from marginwatch.calibration.scores import PseudoMarginHead, ServingGraph
from marginwatch.calibration.threshold import ThresholdRule, make_threshold_rule
from marginwatch.models.architectures import SplitClassifier

# The figures and the decision live in score_figures; kept importable from here, where the
# tests and bench/ have found them.
__all__ = [
    "BOUNDARY_SOURCES",
    "GUARD_SHARE",
    "GUARD_SHARE_WITHOUT_PATHS",
    "MIN_AUROC_GAIN",
    "MIN_SPREAD_GAIN",
    "MIN_TAU_GAIN",
    "ScoreSample",
    "TrainingSet",
    "boundary_outputs",
    "can_learn_pseudo_margin",
    "candidates",
    "choose",
    "decide",
    "guard_scale",
    "measure",
    "multiply_adds",
    "pseudo_train_points",
    "without_pseudo_margin",
]

GUARD_SHARE = 0.25
"""The logit margin's share of its own λ in the guard of a pseudo-margin trained also on
attack-path points (bench/boundary_recall.py compares 0.25–2)."""
GUARD_SHARE_WITHOUT_PATHS = 1.0
"""The same for a pseudo-margin trained on clean points only (`--no-pseudo-paths`)."""
BOUNDARY_SOURCES = 200
"""Subset points the calibration pushes past the boundary (about 10 s on 2 cores)."""


@dataclass(frozen=True)
class TrainingSet:
    """What the pseudo-margin regresses on: score inputs (features or logits) and margin
    targets; `path_points` of them are attack-path points (`pseudo_margin.path_training_points`)."""

    features: np.ndarray
    targets: np.ndarray
    path_points: int = 0


def guard_scale(
    pseudo: np.ndarray,
    logit: np.ndarray,
    nonrobust: np.ndarray,
    rule: ThresholdRule,
    *,
    share: float = GUARD_SHARE,
) -> float:
    """κ of min(g, κ·m) such that κ·m < λ_g exactly where m < share · λ_m, each λ fitted by
    `rule` on its own score. Where a λ is not positive (say, no non-robust point on the
    subset), the medians of the two scores set the scale instead."""
    threshold_pseudo, threshold_logit = rule(pseudo, nonrobust), rule(logit, nonrobust)
    if threshold_pseudo > 0 and threshold_logit > 0:
        return float(threshold_pseudo / (share * threshold_logit))
    top_pseudo, top_logit = float(np.median(np.abs(pseudo))), float(np.median(np.abs(logit)))
    return top_pseudo / top_logit if top_pseudo > 0 and top_logit > 0 else 1.0


def multiply_adds(head: PseudoMarginHead) -> int:
    """Multiply-adds per request of the head (its linear layers), the learned score's cost."""
    layers = [module for module in head.modules() if isinstance(module, torch.nn.Linear)]
    return sum(layer.weight.numel() for layer in layers)


def boundary_outputs(
    model: SplitClassifier,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    eps: float,
    norm: float,
    device: torch.device,
) -> Outputs | None:
    """The model's outputs on first-flip points (step ε/50, within 2ε) of at most
    BOUNDARY_SOURCES of `images`, the correctly classified subset points."""
    keep = slice(0, BOUNDARY_SOURCES)
    x = torch.from_numpy(images[keep]).to(device)
    y = torch.from_numpy(labels[keep]).to(device)
    points, flipped = first_flip(model, x, y, norm=norm, step=eps / 50, max_steps=100)
    if not flipped.any():
        return None
    return forward_all(model, points[flipped].cpu().numpy(), device)


def candidates(
    config: CalibrationConfig,
    regressor: PseudoMarginRegressor,
    *,
    everything: Outputs,
    subset: np.ndarray,
    boundary: Outputs | None,
    kappa: float,
) -> list[ScoreSample]:
    """The logit margin and the guarded pseudo-margin, scored on the subset, the big set and
    the first-flip points (`flags.guarded_score_np`: `scores.guarded_score`, without the graph)."""

    def guarded(outputs: Outputs) -> np.ndarray:
        pseudo = regressor.predict(outputs.score_inputs(config.pseudo_input))
        return guarded_score_np(pseudo, outputs.scores, kappa)

    big = guarded(everything)
    return [
        ScoreSample(
            "logit-margin",
            everything.scores[subset],
            everything.scores,
            None if boundary is None else boundary.scores,
            0,
        ),
        ScoreSample(
            "guarded-pseudo-margin",
            big[subset],
            big,
            None if boundary is None else guarded(boundary),
            multiply_adds(regressor.head_),
        ),
    ]


def choose(
    config: CalibrationConfig,
    model: SplitClassifier,
    *,
    training: TrainingSet,
    images: np.ndarray,
    labels: np.ndarray,
    subset: np.ndarray,
    margins: MarginResult,
    everything: Outputs | None = None,
) -> tuple[ServingGraph, PseudoMarginFacts]:
    """Fit the pseudo-margin on the attacked training points (and their attack paths, when
    `training` has them), measure both candidates on the subset (`subset` indexes `images`, the
    big set, whose true labels are `labels`), and return the serving graph of the one `decide`
    picks, with the facts behind it. `everything`: the model's outputs on `images`, where the
    caller has them already (computed here otherwise)."""
    regressor = PseudoMarginRegressor(
        hidden=config.pseudo_hidden,
        layers=config.pseudo_layers,
        epochs=config.pseudo_epochs,
        seed=config.seed,
        verbose=config.progress,
    ).fit(training.features, training.targets)
    share = GUARD_SHARE if training.path_points else GUARD_SHARE_WITHOUT_PATHS
    if everything is None:
        everything = forward_all(model, images, config.torch_device)
    correct = everything.labels == labels
    rule = make_threshold_rule(threshold_rule_spec(config))
    nonrobust = nonrobust_mask(margins.radius, margins.success, config.resolved_eps)
    pseudo = regressor.predict(everything.take(subset).score_inputs(config.pseudo_input))
    kappa = guard_scale(pseudo, everything.scores[subset], nonrobust, rule, share=share)
    sources = subset[correct[subset]]
    boundary = boundary_outputs(
        model,
        images[sources],
        everything.labels[sources],
        eps=config.resolved_eps,
        norm=config.attack_plan.norm,
        device=config.torch_device,
    )
    samples = candidates(
        config,
        regressor,
        everything=everything,
        subset=subset,
        boundary=boundary,
        kappa=kappa,
    )
    draws = min(config.bootstrap, 300)
    bar = phase(
        "score-choice bootstrap", draws * len(samples), enabled=config.progress, unit="resample"
    )
    with bar as advance:
        logit, learned = (
            measure(
                sample,
                margins=margins.radius,
                nonrobust=nonrobust,
                correct=correct[subset],
                big_correct=correct,
                rule=rule,
                bootstrap=draws,
                seed=config.seed,
                advance=advance,
            )
            for sample in samples
        )
    choice = decide(logit, learned, forced=config.pseudo_margin == "always")
    served = choice.chosen == learned.name
    facts = PseudoMarginFacts(
        score_input=config.pseudo_input,
        hidden=config.pseudo_hidden,
        layers=config.pseudo_layers,
        train_points=len(training.features) - training.path_points,
        path_points=training.path_points,
        guard_share=share,
        held_out_points=len(pseudo),
        logit_margin_tau=logit.kendall_tau,
        logit_margin_auroc=logit.auroc,
        pseudo_margin_tau=kendall_tau(margins.radius, pseudo),
        pseudo_margin_auroc=detection_metrics(nonrobust, pseudo).auroc,
        chosen=served,
        guard_scale=kappa,
        choice=choice,
    )
    if not served:
        return ServingGraph(model), facts
    head = regressor.head_.to(config.torch_device)
    return ServingGraph(model, head, config.pseudo_input, guard_scale=kappa), facts


def pseudo_train_points(config: CalibrationConfig, inputs: Inputs) -> int:
    """The training points the pseudo-margin would be fitted on (`--refit`'s traffic aside)."""
    return min(config.pseudo_train_size, inputs.pseudo_pool)


def can_learn_pseudo_margin(config: CalibrationConfig, inputs: Inputs) -> bool:
    """Whether there are the MIN_PSEUDO_TRAIN_POINTS training points a pseudo-margin needs."""
    return pseudo_train_points(config, inputs) >= MIN_PSEUDO_TRAIN_POINTS


def without_pseudo_margin(
    config: CalibrationConfig,
    *,
    train_points: int,
    labels: np.ndarray,
    subset: np.ndarray,
    margins: MarginResult,
    everything: Outputs,
) -> PseudoMarginFacts:
    """The facts of a run with too few training points (`train_points`, below
    MIN_PSEUDO_TRAIN_POINTS) to learn a pseudo-margin: the logit margin measured as `choose`
    measures it, and the reason it is served."""
    correct = everything.labels == labels
    nonrobust = nonrobust_mask(margins.radius, margins.success, config.resolved_eps)
    sample = ScoreSample("logit-margin", everything.scores[subset], everything.scores, None, 0)
    logit = measure(
        sample,
        margins=margins.radius,
        nonrobust=nonrobust,
        correct=correct[subset],
        big_correct=correct,
        rule=make_threshold_rule(threshold_rule_spec(config)),
        bootstrap=min(config.bootstrap, 300),
        seed=config.seed,
    )
    reason = (
        f"no pseudo-margin learned: {train_points} training points, fewer than the "
        f"{MIN_PSEUDO_TRAIN_POINTS} it needs (the train split's, else the split's points "
        "outside the subset); the free logit margin is served"
    )
    choice = ScoreChoice(
        candidates=[logit],
        chosen=logit.name,
        reason=reason,
        min_auroc_gain=MIN_AUROC_GAIN,
        min_tau_gain=MIN_TAU_GAIN,
        min_spread_gain=MIN_SPREAD_GAIN,
    )
    return PseudoMarginFacts(
        score_input=config.pseudo_input,
        hidden=config.pseudo_hidden,
        layers=config.pseudo_layers,
        train_points=train_points,
        path_points=0,
        held_out_points=len(subset),
        logit_margin_tau=logit.kendall_tau,
        logit_margin_auroc=logit.auroc,
        chosen=False,
        choice=choice,
    )
