"""Boundary recall: does the flag catch inputs just past a decision boundary? (not a test)

    nice .venv/bin/python bench/boundary_recall.py --points 400

On held-out test points (outside the calibration subset; the pseudo-margin trains on training
points), three sets of inputs whose margin is near 0 or at most ε/4:

* first-flip: a fixed-step attack (steps ε/100, ε/50, ε/20, ε/10; `boundary_points.first_flip`)
  from each correctly classified point, stopped at its first flip (within --budget · ε);
* min-norm: the job's attacks' own adversarial points (FMN, FAB-top3), where they flip;
* path: points on the segment to the closer of them, ε/16, ε/8 and ε/4 before it.

Candidates: the logit margin; g, the pseudo-margin MLP on the clean training points; g + paths,
the bench's own re-implementation of the path training (FMN's points only); their guarded
minima with the logit margin at each --shares; and "job default", the serving graph that
`score_choice.choose` builds from `job.pseudo_margin_training` with the job's defaults (path
training on the ensemble's closest adversarial points, the margin cache keeps them, and
`score_choice.GUARD_SHARE`), scored by that graph itself.

For each candidate score, λ is fitted by the job's rule (match-fraction) on the calibration
subset, so the clean flag rate stays what the served flag's is, and recall = the fraction of a
set flagged. Also: τ and AUROC on the subset and on the held-out points, the robust-accuracy
estimate's error and 95 % coverage over resampled subsets of the attacked pool (subset and
held-out points), and the serving cost (ONNX Runtime, 1 thread, µs per call at batch 1 and 64,
and the graph's size). Attack results are cached under --cache; the calibration's margins come
from the store's cache (`marginwatch-calibrate --store STORE` computes them).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from marginwatch.artifact.flags import brittle
from marginwatch.artifact.schema import ThresholdRuleSpec
from marginwatch.artifact.store import default_store
from marginwatch.calibration.attacks import ATTACKS
from marginwatch.calibration.boundary_points import first_flip, path_points
from marginwatch.calibration.config import CalibrationConfig
from marginwatch.calibration.estimators import estimate_robust_accuracy
from marginwatch.calibration.inputs import Inputs, Outputs, forward_all, load_inputs, subset_indices
from marginwatch.calibration.job import (
    graph_scores,
    load_margins,
    margins_for,
    pseudo_margin_training,
)
from marginwatch.calibration.margins import MarginResult, confirmed_radius
from marginwatch.calibration.metrics import detection_metrics, kendall_tau, nonrobust_mask
from marginwatch.calibration.pseudo_margin import PseudoMarginRegressor
from marginwatch.calibration.score_choice import (
    GUARD_SHARE,
    GUARD_SHARE_WITHOUT_PATHS,
    TrainingSet,
    choose,
    guard_scale,
)
from marginwatch.calibration.scores import PseudoMarginHead, ServingGraph
from marginwatch.calibration.threshold import make_threshold_rule
from marginwatch.models.export import export_onnx

ROOT = Path(__file__).resolve().parents[1]
STEP_FRACTIONS = (100, 50, 20, 10)  # fixed-step sizes ε/k
PATH_FRACTIONS = (16, 8, 4)  # path points ε/k before the adversarial point
CPU = torch.device("cpu")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=default_store(), help="holds the margins")
    parser.add_argument("--calibration-seed", type=int, default=0, help="the subset's seed")
    parser.add_argument("--points", type=int, default=400, help="held-out test points")
    parser.add_argument("--seed", type=int, default=1, help="draw of the held-out points")
    parser.add_argument("--budget", type=float, default=2.0, help="first-flip budget, in ε")
    parser.add_argument("--shares", default="0.25,0.5,1,2", help="guard shares to compare")
    parser.add_argument("--draws", type=int, default=40, help="fidelity: resampled subsets")
    parser.add_argument("--bootstrap", type=int, default=300, help="fidelity: bootstrap draws")
    parser.add_argument(
        "--cache", type=Path, default=ROOT / "bench" / "cache", help="attack results cache"
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / "boundary.json", help="figures"
    )
    return parser.parse_args()


@dataclass(frozen=True)
class Calibration:
    config: CalibrationConfig
    subset: np.ndarray
    outputs: Outputs
    margins: MarginResult
    training: TrainingSet
    radius: np.ndarray
    nonrobust: np.ndarray
    correct: np.ndarray
    train_features: np.ndarray
    train_radius: np.ndarray
    train_images: np.ndarray


def calibration(config: CalibrationConfig, inputs: Inputs, subset: np.ndarray) -> Calibration:
    """The default calibration's subset, margins and pseudo-margin training points, as the job
    computes them (cached under the store)."""
    images = inputs.data.float_images
    outputs = forward_all(inputs.model, images[subset], CPU)
    folder, size = margins_for(
        config,
        inputs.model,
        images=images[subset],
        labels=outputs.labels,
        data_id=f"{config.dataset}:{config.split}",
        indices=subset,
    )
    margins = load_margins(config, folder, size)
    training = pseudo_margin_training(config, inputs, subset)
    assert training is not None
    clean = len(training.features) - training.path_points  # the path points come after them
    # the training images again, as pseudo_margin_training draws them (for path augmentation)
    assert inputs.train_data is not None
    pool = np.arange(len(inputs.train_data))
    size = min(config.pseudo_train_size, len(pool))
    chosen = pool[subset_indices(size, len(pool), config.seed + 1)]
    return Calibration(
        config=config,
        subset=subset,
        outputs=outputs,
        margins=margins,
        training=training,
        radius=margins.radius,
        nonrobust=nonrobust_mask(margins.radius, margins.success, config.resolved_eps),
        correct=outputs.labels == inputs.data.labels[subset],
        train_features=training.features[:clean],
        train_radius=training.targets[:clean],
        train_images=inputs.train_data.subset(chosen).float_images,
    )


def cached(cache: Path, name: str, key: str, compute: Callable[[], dict[str, np.ndarray]]) -> dict:  # type: ignore[type-arg]
    path = cache / f"boundary-{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.npz"
    if path.exists():
        with np.load(path) as archive:
            return {k: archive[k] for k in archive.files}
    arrays = compute()
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return arrays


def min_norm_points(
    model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, names: list[str], norm: float
) -> dict[str, np.ndarray]:
    """Each attack's adversarial points and confirmed radii (+∞ where it failed)."""
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    out: dict[str, np.ndarray] = {}
    for name in names:
        parts, radii = [], []
        for start in range(0, len(x), 100):
            xb, yb = x[start : start + 100], y[start : start + 100]
            adv = ATTACKS[name](model, xb, yb, norm=norm, steps=100).detach()
            parts.append(adv)
            radii.append(confirmed_radius(model, xb, adv, yb, norm))
        out[f"adv:{name}"] = torch.cat(parts).numpy()
        out[f"radius:{name}"] = torch.cat(radii).numpy()
    return out


def first_flip_points(
    model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, *, eps: float, norm: float,
    budget: float,
) -> dict[str, np.ndarray]:  # fmt: skip
    out: dict[str, np.ndarray] = {}
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    for k in STEP_FRACTIONS:
        step = eps / k
        points, flipped = first_flip(
            model, x, y, norm=norm, step=step, max_steps=math.ceil(budget * k)
        )
        out[f"flip:{k}"] = points[flipped].numpy()
    return out


def augmented_training(
    model: torch.nn.Module, cal: Calibration, norm: float, cache: Path
) -> tuple[np.ndarray, np.ndarray]:
    """Training points plus points on their FMN paths, with margin targets (1 − t)·‖x* − x‖."""
    labels = forward_all(model, cal.train_images, CPU).labels  # type: ignore[arg-type]
    key = f"train-fmn:{len(cal.train_images)}:{norm}"
    fmn = cached(
        cache,
        "train-fmn",
        key,
        lambda: min_norm_points(model, cal.train_images, labels, ["fmn"], norm),
    )
    adv, radius = torch.from_numpy(fmn["adv:fmn"]), torch.from_numpy(fmn["radius:fmn"])
    ok = torch.isfinite(radius)
    x = torch.from_numpy(cal.train_images)[ok]
    r = radius[ok]
    features, targets = [cal.train_features], [cal.train_radius]
    for t in (0.5, 0.75, 0.9, 1.0):
        points = x + t * (adv[ok] - x)
        features.append(forward_all(model, points.float().numpy(), CPU).features)  # type: ignore[arg-type]
        targets.append(((1 - t) * r).numpy())
    return np.concatenate(features), np.concatenate(targets)


def onnx_cost(graph: ServingGraph, images: np.ndarray) -> dict[str, float]:
    buffer = io.BytesIO()
    export_onnx(graph.eval(), (1, 28, 28), buffer, ["logits", "score"])
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    out = {"graph_kb": len(buffer.getvalue()) / 1024}
    for batch in (1, 64):
        x = images[:batch]
        times = []
        for _ in range(15):
            started = time.perf_counter()
            for _ in range(20):
                session.run(["logits", "score"], {"input": x})
            times.append((time.perf_counter() - started) / 20)
        out[f"us_batch_{batch}"] = 1e6 * float(np.median(times))
    return out


def main() -> None:  # noqa: C901, PLR0915 - a benchmark script, read top to bottom
    args = parse_args()
    config = CalibrationConfig(store=args.store, quiet=True, seed=args.calibration_seed)
    inputs = load_inputs(config)
    model = inputs.model.eval()
    eps, norm = config.resolved_eps, config.attack_plan.norm
    rule = make_threshold_rule(ThresholdRuleSpec(name=config.threshold_rule))
    data = inputs.data
    subset = subset_indices(config.subset_size, len(data), config.seed)
    outside = np.setdiff1d(np.arange(len(data)), subset)
    held = np.sort(np.random.default_rng(args.seed).choice(outside, args.points, replace=False))
    held_images = data.float_images[held]
    held_out = forward_all(model, held_images, CPU)
    held_correct = held_out.labels == data.labels[held]
    key = f"{held.tobytes().hex()}:{eps}:{norm}"
    started = time.monotonic()
    attacks = cached(args.cache, "minnorm", key, lambda: min_norm_points(
        model, held_images, held_out.labels, list(config.attack_plan.names), norm))  # fmt: skip
    flips = cached(args.cache, "flip", f"{key}:{args.budget}", lambda: first_flip_points(
        model, held_images[held_correct], held_out.labels[held_correct], eps=eps, norm=norm,
        budget=args.budget,
    ))  # fmt: skip
    print(f"attacks: {time.monotonic() - started:.0f} s (cached under {args.cache})")
    cal = calibration(config, inputs, subset)
    names = list(config.attack_plan.names)
    radii = np.stack([attacks[f"radius:{n}"] for n in names])
    best = radii.argmin(0)
    held_radius = radii.min(0)
    held_ok = np.isfinite(held_radius)
    advs = np.stack([attacks[f"adv:{n}"] for n in names])[best, np.arange(len(held))]
    sets: dict[str, np.ndarray] = {f"first-flip ε/{k}": flips[f"flip:{k}"] for k in STEP_FRACTIONS}
    for n in names:
        sets[f"min-norm {n}"] = attacks[f"adv:{n}"][np.isfinite(attacks[f"radius:{n}"])]
    path, _ = path_points(
        torch.from_numpy(held_images[held_ok]),
        torch.from_numpy(advs[held_ok]),
        torch.from_numpy(held_radius[held_ok]),
        [eps / k for k in PATH_FRACTIONS],
    )
    sets["path ≤ ε/4"] = path.float().numpy()
    set_outputs = {name: forward_all(model, points, CPU) for name, points in sets.items()}
    held_nonrobust = nonrobust_mask(held_radius, held_ok, eps)

    # candidates: (subset scores, function of Outputs, serving graph)
    regressor = PseudoMarginRegressor(
        hidden=config.pseudo_hidden, layers=config.pseudo_layers, epochs=config.pseudo_epochs,
        seed=config.seed,
    ).fit(cal.train_features, cal.train_radius)  # fmt: skip
    aug_x, aug_y = augmented_training(model, cal, norm, args.cache)
    augmented = PseudoMarginRegressor(
        hidden=config.pseudo_hidden, layers=config.pseudo_layers, epochs=config.pseudo_epochs,
        seed=config.seed,
    ).fit(aug_x, aug_y)  # fmt: skip
    heads: dict[str, PseudoMarginRegressor] = {"pseudo": regressor, "pseudo+paths": augmented}
    # the job's own candidate: the graph `choose` builds, scored by that graph on every set
    job_graph, job_facts = choose(
        config, model, training=cal.training, images=data.float_images, labels=data.labels,
        subset=subset, margins=cal.margins,
    )  # fmt: skip
    job_images = {"subset": data.float_images[subset], "held": held_images, **sets}
    job_scores = {
        where: graph_scores(job_graph, points, CPU) for where, points in job_images.items()
    }
    reason = job_facts.choice.reason if job_facts.choice else ""
    print(f"job default: {job_facts.path_points} path points, share {job_facts.guard_share}, "
          f"κ {job_facts.guard_scale}; {reason}")  # fmt: skip

    def score_of(name: str, outputs: Outputs, where: str) -> np.ndarray:
        if name == "logit-margin":
            return outputs.scores
        if name == "job default":
            return job_scores[where]
        head, _, share = name.partition(" guard ")
        pseudo = heads[head].predict(outputs.features)
        if not share:
            return pseudo
        return np.minimum(pseudo, kappas[name] * outputs.scores)

    shares = [float(s) for s in args.shares.split(",")]
    candidates = ["logit-margin", "pseudo", "pseudo+paths", "job default"]
    job_share = {"pseudo": GUARD_SHARE_WITHOUT_PATHS, "pseudo+paths": GUARD_SHARE}
    kappas: dict[str, float] = {}
    for head, fitted in heads.items():
        pseudo_subset = fitted.predict(cal.outputs.features)
        lam_p, lam_l = rule(pseudo_subset, cal.nonrobust), rule(cal.outputs.scores, cal.nonrobust)
        for share in shares:
            name = f"{head} guard {share:g}"
            kappas[name] = lam_p / (share * lam_l)
            candidates.append(name)
        share = job_share[head]
        job_kappa = guard_scale(pseudo_subset, cal.outputs.scores, cal.nonrobust, rule, share=share)
        assert f"{head} guard {share:g}" not in kappas or math.isclose(
            kappas[f"{head} guard {share:g}"], job_kappa
        )

    pool_nonrobust = np.concatenate([cal.nonrobust, held_nonrobust])
    pool_correct = np.concatenate([cal.correct, held_correct])
    truth = float(np.mean(pool_correct & ~pool_nonrobust))
    figures: dict[str, dict[str, float]] = {}
    for name in candidates:
        subset_scores = score_of(name, cal.outputs, "subset")
        threshold = rule(subset_scores, cal.nonrobust)
        held_scores = score_of(name, held_out, "held")
        row = {
            "lambda": threshold,
            "subset_flag_rate": float(np.mean(brittle(subset_scores, threshold))),
            "held_flag_rate": float(np.mean(brittle(held_scores, threshold))),
            "subset_tau": kendall_tau(cal.radius, subset_scores),
            "subset_auroc": detection_metrics(cal.nonrobust, subset_scores).auroc,
            "held_tau": kendall_tau(held_radius, held_scores),
            "held_auroc": detection_metrics(held_nonrobust, held_scores).auroc,
        }
        caught, total = 0, 0
        for set_name, outputs in set_outputs.items():
            is_brittle = brittle(score_of(name, outputs, set_name), threshold)
            row[f"recall {set_name}"] = (
                float(is_brittle.mean()) if is_brittle.size else float("nan")
            )
            row[f"n {set_name}"] = int(is_brittle.size)
            caught, total = caught + int(is_brittle.sum()), total + is_brittle.size
        row["recall all"] = caught / total
        pool_scores = np.concatenate([subset_scores, held_scores])
        errors, covered = [], 0
        rng = np.random.default_rng(0)
        for draw in range(args.draws):
            pick = rng.choice(pool_scores.size, size=pool_scores.size // 4, replace=False)
            estimate = estimate_robust_accuracy(
                pool_scores[pick], pool_correct[pick], ~pool_nonrobust[pick],
                pool_scores, pool_correct, threshold_rule=rule, method="regression",
                bootstrap=args.bootstrap, seed=draw,
            )  # fmt: skip
            errors.append(estimate.estimate - truth)
            covered += bool(estimate.ci_low <= truth <= estimate.ci_high)  # type: ignore[operator]
        row["fidelity_mae_points"] = 100 * float(np.mean(np.abs(errors)))
        row["fidelity_coverage"] = covered / args.draws
        figures[name] = row

    # serving cost of the graph kinds (the head's size is the same for every learned candidate)
    mlp: PseudoMarginHead = regressor.head_
    cost_graphs = {
        "logit-margin": ServingGraph(model),
        "pseudo": ServingGraph(model, mlp, "features"),
        "pseudo guard": ServingGraph(model, mlp, "features", guard_scale=1.0),
    }
    costs = {name: onnx_cost(graph, held_images) for name, graph in cost_graphs.items()}
    result = {"truth_pool_robust_accuracy": truth, "pool_points": int(pool_correct.size),
              "held_points": args.points, "candidates": figures, "serving": costs}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    set_names = list(sets)
    print(f"pool robust accuracy (truth) {truth:.4f} on {pool_correct.size} attacked points")
    print("sets: " + ", ".join(f"{s} ({len(sets[s])})" for s in set_names))
    header = "candidate               λ      flag(sub/held) τ(sub/held)   AUROC(sub/held)  "
    print(header + "  ".join(s.split()[-1] for s in set_names) + "  all   MAE  cover")
    for name, row in figures.items():
        pairs = [("subset_flag_rate", "held_flag_rate"), ("subset_tau", "held_tau"),
                 ("subset_auroc", "held_auroc")]  # fmt: skip
        cells = [f"{row['lambda']:.4f}"] + [f"{row[a]:.3f}/{row[b]:.3f}" for a, b in pairs]
        cells += [f"{row[f'recall {s}']:.3f}" for s in [*set_names, "all"]]
        cells += [f"{row['fidelity_mae_points']:.2f}", f"{row['fidelity_coverage']:.2f}"]
        print(f"{name:22s} " + "  ".join(cells))
    for name, cost in costs.items():
        print(f"serving {name:14s} {cost['us_batch_1']:7.1f} µs (batch 1)  "
              f"{cost['us_batch_64']:8.1f} µs (batch 64)  {cost['graph_kb']:.0f} KiB")  # fmt: skip


if __name__ == "__main__":
    main()
