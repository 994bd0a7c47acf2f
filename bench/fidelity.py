"""Fidelity of the robust-accuracy estimate: ground truth on every test point against the
estimate from a small attacked subset, over many seeds (not part of the tests).

    .venv/bin/python bench/fidelity.py --model fmnist-cnn-pgd --seeds 20 --subset-size 500

Step 1 attacks every point of the split once with the job's attack ensemble (cached in chunks
under --cache, resumable; `--shard I --num-shards N` splits it over processes). Ground truth is
mean(correct and margin > ε) over the whole split. Step 2 draws each seed's subset with the
job's own `subset_indices`, looks its margins up (the same attacks would give the same radii),
and runs both estimators with their bootstrap intervals, for the logit margin and for a
pseudo-margin fitted on attacked training points. Prints mean absolute error, bias and the
coverage of the 95 % intervals; writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from marginwatch.artifact.schema import ThresholdRuleSpec
from marginwatch.calibration import margin_cache
from marginwatch.calibration.config import NORM_VALUES
from marginwatch.calibration.estimators import estimate_robust_accuracy
from marginwatch.calibration.job import forward_all, subset_indices
from marginwatch.calibration.metrics import detection_metrics, kendall_tau, nonrobust_mask
from marginwatch.calibration.pseudo_margin import PseudoMarginRegressor
from marginwatch.calibration.threshold import make_threshold_rule
from marginwatch.models.data import load_dataset
from marginwatch.models.registry import load_model

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fmnist-cnn-pgd", help="model spec")
    parser.add_argument("--dataset", default="fashion-mnist", help="dataset name or .npz")
    parser.add_argument("--norm", choices=["linf", "l2"], default="linf")
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--attack", action="append", default=None, help="NAME:STEPS, repeatable")
    parser.add_argument("--subset-size", type=int, default=500)
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--pseudo-train-size", type=int, default=1000)
    parser.add_argument("--cache", type=Path, default=ROOT / "bench" / "cache")
    parser.add_argument("--shard", type=int, default=None, help="only attack this shard")
    parser.add_argument("--num-shards", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fidelity.json")
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
        for method in ("count", "regression"):
            errors, covered = [], 0
            for seed in range(args.seeds):
                subset = subset_indices(args.subset_size, len(images), seed)
                estimate = estimate_robust_accuracy(
                    score[subset], correct[subset], robust[subset], score, correct,
                    threshold_rule=rule, method=method, bootstrap=args.bootstrap, seed=seed,
                )  # fmt: skip
                errors.append(estimate.estimate - truth)
                low, high = estimate.ci_low, estimate.ci_high  # None with --bootstrap 0
                covered += low is not None and high is not None and low <= truth <= high
            prefix = f"{score_name}/{method}"
            figures[f"{prefix}/mae_points"] = 100 * float(np.mean(np.abs(errors)))
            figures[f"{prefix}/bias_points"] = 100 * float(np.mean(errors))
            figures[f"{prefix}/coverage"] = covered / args.seeds
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    for key, value in figures.items():
        print(f"{key:40s} {value:.4f}" if isinstance(value, float) else f"{key:40s} {value}")


if __name__ == "__main__":
    main()
