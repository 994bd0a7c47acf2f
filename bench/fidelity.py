"""Fidelity of the robust-accuracy estimate: ground truth on every test point against the
estimate from a small attacked subset, over many seeds (not part of the tests).

    .venv/bin/python bench/fidelity.py --model fmnist-cnn-pgd --seeds 20 --subset-size 500

Step 1 attacks every point of the split once with the job's attack ensemble (cached in chunks
under --cache, resumable; `--shard I --num-shards N` splits it over processes). Ground truth is
mean(correct and margin > ε) over the whole split. Step 2 draws each seed's subset with the
job's own `subset_indices`, looks its margins up (the same attacks would give the same radii),
and runs both estimators with their bootstrap intervals, for the logit margin, for a plain
pseudo-margin fitted on attacked training points, and for "job default": the score the job
serves, built once by the job's own code (`job.pseudo_margin_training`, `score_choice.choose`:
the pseudo-margin trained also on attack-path points, guarded by the logit margin), whose guard
scale κ (`score_choice.guard_scale`) is refitted on each seed's subset as a calibration with
that subset would. Prints mean absolute error, bias and the coverage of the 95 % intervals;
writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from marginwatch.artifact.schema import ThresholdRuleSpec
from marginwatch.artifact.store import default_store
from marginwatch.calibration import margin_cache
from marginwatch.calibration.config import NORM_VALUES, CalibrationConfig
from marginwatch.calibration.estimators import estimate_robust_accuracy
from marginwatch.calibration.inputs import load_inputs
from marginwatch.calibration.job import (
    forward_all,
    graph_scores,
    pseudo_margin_training,
    subset_indices,
)
from marginwatch.calibration.margins import MarginResult
from marginwatch.calibration.metrics import detection_metrics, kendall_tau, nonrobust_mask
from marginwatch.calibration.pseudo_margin import PseudoMarginRegressor
from marginwatch.calibration.record import threshold_rule_spec
from marginwatch.calibration.score_choice import choose, guard_scale
from marginwatch.calibration.threshold import ThresholdRule, make_threshold_rule
from marginwatch.models.data import load_dataset
from marginwatch.models.registry import load_model

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fmnist-cnn-pgd", help="model spec")
    parser.add_argument("--dataset", default="fashion-mnist", help="dataset name or .npz")
    parser.add_argument("--norm", choices=["linf", "l2"], default="linf", help="threat model")
    parser.add_argument("--eps", type=float, default=0.1, help="budget ε of the threat model")
    parser.add_argument("--attack", action="append", default=None, help="NAME:STEPS, repeatable")
    parser.add_argument("--subset-size", type=int, default=500, help="points per subset")
    parser.add_argument("--seeds", type=int, default=20, help="subsets drawn (seeds 0, 1, …)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap draws (0: none)")
    parser.add_argument(
        "--pseudo-train-size", type=int, default=1000, help="attacked training points per MLP"
    )
    parser.add_argument(
        "--cache", type=Path, default=ROOT / "bench" / "cache", help="attack results cache"
    )
    parser.add_argument(
        "--store",
        type=Path,
        default=default_store(),
        help="store whose margin cache holds the job default's attacked training points "
        "(`marginwatch-calibrate --store STORE` fills it; attacked here where missing)",
    )
    parser.add_argument(
        "--calibration-seed",
        type=int,
        default=0,
        help="job default: the seed of the calibration that trains it (training points, MLP)",
    )
    parser.add_argument(
        "--job-pseudo-margin",
        choices=["auto", "always"],
        default="auto",
        help="job default: the job's --pseudo-margin (auto: the score the job chooses; always: "
        "the guarded pseudo-margin even where the job would serve the logit margin)",
    )
    parser.add_argument("--shard", type=int, default=None, help="only attack this shard")
    parser.add_argument("--num-shards", type=int, default=1, help="shard count")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / "fidelity.json", help="figures"
    )
    return parser.parse_args()


def margins_of(args, model, images, labels, *, tag, plan, shard=None):  # type: ignore[no-untyped-def]
    indices = np.arange(len(images))
    key = margin_cache.cache_key(margin_cache.state_dict_sha256(model), tag, indices, plan)
    folder = args.cache / key
    chunks = (
        margin_cache.shard_chunks(len(images), shard, args.num_shards)
        if shard is not None
        else margin_cache.missing_chunks(folder, len(images))
    )
    margin_cache.compute_chunks(
        folder,
        model,
        torch.from_numpy(images),
        torch.from_numpy(labels),
        plan=plan,
        chunks=chunks,
        batch_size=100,
        progress=True,
    )
    if shard is not None:
        return None
    return margin_cache.load_chunks(folder, len(images), plan)


def constant(score: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """A score that does not depend on the calibration's subset."""
    return lambda _subset: score


def estimator_figures(
    args: argparse.Namespace,
    name: str,
    score_for: Callable[[np.ndarray], np.ndarray],
    *,
    correct: np.ndarray,
    robust: np.ndarray,
    truth: float,
    rule: ThresholdRule,
) -> dict[str, float]:
    """Mean absolute error, bias (points) and 95 % coverage of both estimators over the seeds;
    `score_for(subset)` is the score of every point as the calibration on `subset` serves it."""
    figures: dict[str, float] = {}
    for method in ("count", "regression"):
        errors, covered = [], 0
        for seed in range(args.seeds):
            subset = subset_indices(args.subset_size, len(correct), seed)
            score = score_for(subset)
            estimate = estimate_robust_accuracy(
                score[subset], correct[subset], robust[subset], score, correct,
                threshold_rule=rule, method=method, bootstrap=args.bootstrap, seed=seed,
            )  # fmt: skip
            errors.append(estimate.estimate - truth)
            low, high = estimate.ci_low, estimate.ci_high  # None with --bootstrap 0
            covered += low is not None and high is not None and low <= truth <= high
        prefix = f"{name}/{method}"
        figures[f"{prefix}/mae_points"] = 100 * float(np.mean(np.abs(errors)))
        figures[f"{prefix}/bias_points"] = 100 * float(np.mean(errors))
        figures[f"{prefix}/coverage"] = covered / args.seeds
    return figures


def job_default(
    args: argparse.Namespace, attacks: tuple[tuple[str, int], ...], truth_margins: MarginResult
) -> tuple[Callable[[np.ndarray], np.ndarray], ThresholdRule, dict[str, object]]:
    """The job's default score, built once by the job's own code for the calibration of
    --calibration-seed: its training set (attacked training points and their attack paths,
    cached in --store), the MLP and the choice `score_choice.choose` makes. Returns the score
    of every point as the calibration on a given subset serves it (the guard scale κ refitted
    on that subset, as that calibration would fit it), the job's threshold rule, and the facts
    of the choice."""
    config = CalibrationConfig(
        model=args.model, dataset=args.dataset, norm=args.norm, eps=args.eps, attacks=attacks,
        subset_size=args.subset_size, pseudo_train_size=args.pseudo_train_size,
        bootstrap=args.bootstrap, store=args.store, seed=args.calibration_seed, quiet=True,
        pseudo_margin=args.job_pseudo_margin,
    )  # fmt: skip
    inputs = load_inputs(config)
    images, cpu = inputs.data.float_images, torch.device("cpu")
    subset = subset_indices(config.subset_size, len(images), config.seed)
    training = pseudo_margin_training(config, inputs, subset)
    assert training is not None  # None only in shard mode
    # the subset's margins are the whole split's (the same attacks give the same radii)
    margins = MarginResult(
        radius=truth_margins.radius[subset],
        success=truth_margins.success[subset],
        per_attack={name: radii[subset] for name, radii in truth_margins.per_attack.items()},
        censored_at=truth_margins.censored_at[subset],
        norm=truth_margins.norm,
        adv_inputs=None if truth_margins.adv_inputs is None else truth_margins.adv_inputs[subset],
    )
    graph, facts = choose(
        config, inputs.model, training=training, images=images, labels=inputs.data.labels,
        subset=subset, margins=margins,
    )  # fmt: skip
    rule = make_threshold_rule(threshold_rule_spec(config))
    summary: dict[str, object] = {
        "train_points": facts.train_points,
        "path_points": facts.path_points,
        "guard_share": facts.guard_share,
        "served": "guarded pseudo-margin" if facts.chosen else "logit margin",
        "reason": facts.choice.reason if facts.choice else "",
    }
    served = graph_scores(graph, images, cpu)
    if graph.pseudo_margin is None or graph.guard_scale is None:
        return constant(served), rule, summary  # the job serves the logit margin
    share = facts.guard_share
    if share is None:
        raise RuntimeError("the job serves a guarded score but records no guard share")
    everything = forward_all(inputs.model, images, cpu)
    with torch.no_grad():
        head = graph.pseudo_margin.cpu().eval()
        pseudo = head(torch.from_numpy(everything.score_inputs(config.pseudo_input))).numpy()
    logit = everything.scores
    nonrobust = nonrobust_mask(truth_margins.radius, truth_margins.success, config.resolved_eps)
    # the graph's own scores, from its calibration's κ: the numpy minimum must match them
    rebuilt = np.minimum(pseudo, graph.guard_scale * logit)
    assert np.allclose(rebuilt, served, rtol=1e-4, atol=1e-5), "rebuilt score differs"

    def score_for(subset: np.ndarray) -> np.ndarray:
        kappa = guard_scale(pseudo[subset], logit[subset], nonrobust[subset], rule, share=share)
        return np.minimum(pseudo, kappa * logit)

    return score_for, rule, summary


def main() -> None:
    args = parse_args()
    attacks = [a.partition(":") for a in (args.attack or ["fmn:100", "fab-top3:100"])]
    plan = margin_cache.AttackPlan(
        tuple(name for name, _, _ in attacks),
        tuple(int(steps or 100) for _, _, steps in attacks),
        NORM_VALUES[args.norm],
    )
    model = load_model(args.model)
    test = load_dataset(args.dataset, "test")
    images = test.float_images
    outputs = forward_all(model, images, torch.device("cpu"))
    started = time.monotonic()
    truth_margins = margins_of(
        args, model, images, outputs.labels, tag="test-all", plan=plan, shard=args.shard
    )
    if truth_margins is None:
        print(f"shard {args.shard} done in {time.monotonic() - started:.0f} s")
        return
    correct = outputs.labels == test.labels
    nonrobust = nonrobust_mask(truth_margins.radius, truth_margins.success, args.eps)
    robust = ~nonrobust
    truth = float(np.mean(correct & robust))
    train = load_dataset(args.dataset, "train")
    train_idx = subset_indices(args.pseudo_train_size, len(train), 12345)
    train_images = train.float_images[train_idx]
    train_out = forward_all(model, train_images, torch.device("cpu"))
    train_margins = margins_of(
        args, model, train_images, train_out.labels, tag="train-pm", plan=plan
    )
    regressor = PseudoMarginRegressor().fit(train_out.features, train_margins.finite_radius)
    scores = {"logit-margin": outputs.scores, "pseudo-margin": regressor.predict(outputs.features)}
    rule = make_threshold_rule(ThresholdRuleSpec(name="match-fraction"))
    figures: dict[str, object] = {
        "model": args.model,
        "points": len(images),
        "ground_truth_robust_accuracy": truth,
        "clean_accuracy": float(correct.mean()),
        "censored": int((~truth_margins.success).sum()),
        "subset_size": args.subset_size,
        "seeds": args.seeds,
        "attacks": [f"{n}:{s}" for n, s in zip(plan.names, plan.steps, strict=True)],
    }
    for score_name, score in scores.items():
        figures[f"{score_name}/kendall_tau_all"] = kendall_tau(truth_margins.radius, score)
        figures[f"{score_name}/auroc_all"] = detection_metrics(nonrobust, score).auroc
        figures |= estimator_figures(
            args, score_name, constant(score),
            correct=correct, robust=robust, truth=truth, rule=rule,
        )  # fmt: skip
    pairs = tuple(zip(plan.names, plan.steps, strict=True))
    default_score, default_rule, facts = job_default(args, pairs, truth_margins)
    figures |= {f"job default/{key}": value for key, value in facts.items()}
    served = default_score(subset_indices(args.subset_size, len(images), args.calibration_seed))
    figures["job default/kendall_tau_all"] = kendall_tau(truth_margins.radius, served)
    figures["job default/auroc_all"] = detection_metrics(nonrobust, served).auroc
    figures |= estimator_figures(
        args, "job default", default_score,
        correct=correct, robust=robust, truth=truth, rule=default_rule,
    )  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    for key, value in figures.items():
        print(f"{key:40s} {value:.4f}" if isinstance(value, float) else f"{key:40s} {value}")


if __name__ == "__main__":
    main()
