"""Fidelity of the robustness answers (issue 20): `p_robust`, the margin interval, the
robust-accuracy estimate at every grid budget and the runner-up, against ground truth on every
test point (not part of the tests).

    .venv/bin/python bench/answers_fidelity.py --seeds 20 --subset-size 500

Ground truth: the margins of all 10,000 test points by the job's attack ensemble, read from the
cache `bench/fidelity.py` fills (tag "test-all"; run it first: this bench attacks nothing).
Scores, logits and labels come from the ONNX graph of the version CURRENT names in --store, fed
[0, 1] floats as the service feeds it, so every score is exactly the served one; ε is that
record's (the record's own fits are not used: each seed refits). Each seed draws the job's
subset (`inputs.subset_indices`) and fits the answers on it with the job's own code and defaults
(`record.answer_points`, `record.rule_at`, `answers.fit_budget`, `record.margin_quantiles`); the
service's evaluation (`artifact.answers.Answers`) then answers every point outside the subset.
Prints a table; writes the figures as JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from marginwatch.artifact.answers import Answers, Budget, runner_up
from marginwatch.artifact.graph import INPUT_NAME, OUTPUTS
from marginwatch.artifact.schema import (
    ONNX_FILE,
    CalibrationRecord,
    MarginQuantiles,
    ThresholdRuleSpec,
)
from marginwatch.artifact.store import current_dir, default_store, read_record
from marginwatch.calibration import margin_cache
from marginwatch.calibration.answers import (
    AnswerChecks,
    Margins,
    Subset,
    expected_calibration_error,
    fit_budget,
    interval_coverage,
    reliability_table,
    table_ece,
)
from marginwatch.calibration.config import (
    DEFAULT_ATTACKS,
    DEFAULT_STEPS,
    NORM_VALUES,
    CalibrationConfig,
)
from marginwatch.calibration.inputs import forward_all, subset_indices
from marginwatch.calibration.margins import MarginResult
from marginwatch.calibration.record import answer_points, margin_quantiles, rule_at
from marginwatch.models.data import load_dataset
from marginwatch.models.registry import load_model

ROOT = Path(__file__).resolve().parents[1]
JOB = CalibrationConfig.model_fields  # the job's defaults, so the bench follows them
Figures = dict[str, Any]  # JSON-ready


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add, job = parser.add_argument, {name: field.default for name, field in JOB.items()}
    d = " (%(default)s)"
    add("--model", default="fmnist-cnn-pgd", help="model in --store, and weights spec" + d)
    add("--dataset", default="fashion-mnist", help="dataset whose test split is attacked" + d)
    add("--store", type=Path, default=default_store(), help="store whose CURRENT is served" + d)
    add("--cache", type=Path, default=ROOT / "bench" / "cache", help="margins cache" + d)
    add("--attack", action="append", metavar="NAME:STEPS", help="cached attacks, repeatable "
        "(default: the job's for the record's norm, 100 steps each)")  # fmt: skip
    add("--eps-grid", type=float, nargs="+", metavar="EPS", help="budgets checked (default: "
        "ε/4, ε/2, ε, 2ε, ε the record's); ε is always among them")  # fmt: skip
    add("--seeds", type=int, default=20, help="subsets drawn: seeds 0 … SEEDS − 1" + d)
    add("--subset-size", type=int, default=job["subset_size"], help="points per subset" + d)
    add("--bootstrap", type=int, default=job["bootstrap"], help="bootstrap draws" + d)
    estimators, rules = ["count", "regression"], ["match-fraction", "target-tpr"]
    add("--estimator", choices=estimators, default=job["estimator"], help="RA estimator" + d)
    add("--threshold-rule", choices=rules, default=job["threshold_rule"], help="λ's rule" + d)
    add("--target-tpr", type=float, default=job["target_tpr"], help="for target-tpr" + d)
    add("--interval", type=float, default=job["margin_interval"], help="interval level" + d)
    add("--bins", type=int, default=10, help="equal-width bins of p_robust's ECE" + d)
    out = ROOT / "bench" / "results" / "answers_fidelity.json"
    add("--out", type=Path, default=out, help="the figures, as JSON" + d)
    return parser.parse_args()


def machine_state() -> str:
    """`uptime`'s line: how loaded the machine was (the fits are CPU-bound)."""
    try:
        line = subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        line = "load average: " + ", ".join(f"{load:.2f}" for load in os.getloadavg())
    return f"{line.strip()}; {os.cpu_count()} CPUs"


@dataclass(frozen=True)
class Points:
    """Every test point as served (ONNX) and its ground truth (cached margins)."""

    logits: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    correct: np.ndarray
    result: MarginResult
    margins: Margins
    adv_labels: np.ndarray | None  # the class each cached adversarial input reaches


def served_outputs(onnx_path: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Logits and score of every image from the version's graph, as the service runs it."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    parts = [
        session.run(list(OUTPUTS), {INPUT_NAME: images[start : start + 500]})
        for start in range(0, len(images), 500)
    ]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def cached_margins(
    args: argparse.Namespace, record: CalibrationRecord, images: np.ndarray
) -> tuple[MarginResult, np.ndarray, np.ndarray | None]:
    """The cached ground truth, the attacked labels and the adversarial inputs' classes (torch,
    the model that confirmed them); exits naming the missing chunks rather than attacking."""
    norm = record.threat_model.norm
    pairs = [a.partition(":") for a in args.attack or DEFAULT_ATTACKS[norm]]
    plan = margin_cache.AttackPlan(
        tuple(name for name, _, _ in pairs),
        tuple(int(steps or DEFAULT_STEPS) for _, _, steps in pairs),
        NORM_VALUES[norm],
    )
    model = load_model(args.model)
    outputs = forward_all(model, images, torch.device("cpu"))
    key = margin_cache.cache_key(
        margin_cache.state_dict_sha256(model), "test-all", np.arange(len(images)), plan
    )
    try:
        result = margin_cache.load_chunks(args.cache / key, len(images), plan)
    except FileNotFoundError as error:
        raise SystemExit(
            f"answers_fidelity: ground truth incomplete ({error}); fill it with "
            "bench/fidelity.py --shard I --num-shards N first"
        ) from None
    adv = None
    if result.adv_inputs is not None:
        adversarial = np.array(result.adv_inputs)  # writable: torch warns on a read-only one
        adv = forward_all(model, adversarial, torch.device("cpu")).labels
    return result, outputs.labels, adv


def load_points(args: argparse.Namespace, record: CalibrationRecord, onnx: Path) -> Points:
    images = load_dataset(args.dataset, "test")
    logits, scores = served_outputs(onnx, images.float_images)
    result, attacked, adv = cached_margins(args, record, images.float_images)
    labels = logits.argmax(axis=1)
    if np.any(attacked != labels):
        print(f"note: {int(np.sum(attacked != labels))} served labels differ from torch's")
    margins = Margins.of(result.radius, result.success, result.censored_at)
    return Points(logits, scores, labels, labels == images.labels, result, margins, adv)


def robust_truth(margins: Margins, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """(robust, known): margin > eps; a censored bound at or below eps leaves it unknown
    (`known` False, `robust` False there)."""
    known = margins.observed | (margins.value > eps)
    return known & (margins.value > eps), known


def truth_bracket(correct: np.ndarray, margins: Margins, eps: float) -> tuple[float, float]:
    """Robust accuracy at eps, its unknown points counted as non-robust, then as robust (the
    same number without censoring)."""
    robust, known = robust_truth(margins, eps)
    return float(np.mean(correct & robust)), float(np.mean(correct & (robust | ~known)))


def held_out_interval(low: np.ndarray, high: np.ndarray, margins: Margins) -> dict[str, float]:
    """Coverage of [low, high] by the job's own rule (`interval_coverage`: a censored margin is
    inside only when its bound reaches high, unknown otherwise), and each tail's share among
    the observed margins (0.1 each for an exact 80 % interval)."""
    unused = np.empty(0)  # interval_coverage reads the interval and the margins only
    coverage = interval_coverage(AnswerChecks(unused, unused, low, high, margins))
    seen = margins.value[margins.observed]
    return {
        "coverage": coverage,
        "below_low": float(np.mean(seen < low[margins.observed])),
        "above_high": float(np.mean(seen > high[margins.observed])),
    }


def median_error(estimate: np.ndarray, margins: Margins) -> dict[str, float]:
    """|estimate − margin| over the observed margins: mean and median."""
    error = np.abs(estimate[margins.observed] - margins.value[margins.observed])
    return {
        "median_abs_error_mean": float(error.mean()),
        "median_abs_error_median": float(np.median(error)),
    }


def runner_up_share(points: Points, eps: float) -> dict[str, float | int | None]:
    """Among points whose cached adversarial input flips the label: the share whose
    adversarial class is the clean input's served runner-up (also among the margins ≤ eps, the
    brittle ones, and the share within the two highest other logits)."""
    if points.adv_labels is None:
        return {"flipped": 0, "share": None}
    flipped = points.result.success & (points.adv_labels != points.labels)
    served = runner_up(points.logits, points.labels)
    others = np.array(points.logits, dtype=np.float64)
    others[np.arange(len(others)), points.labels] = -np.inf
    top2 = np.argsort(-others, axis=1, kind="stable")[:, :2]
    hits = flipped & (points.adv_labels == served)
    near = flipped & (points.result.radius <= eps)

    def share(mask: np.ndarray, among: np.ndarray) -> float | None:
        return float(mask[among].mean()) if among.any() else None

    in_top2 = (top2 == points.adv_labels[:, None]).any(axis=1)
    return {"flipped": int(flipped.sum()), "share": share(hits, flipped),
            "flipped_within_eps": int(near.sum()), "share_within_eps": share(hits, near),
            "share_top2": share(in_top2, flipped)}  # fmt: skip


def take(result: MarginResult, rows: np.ndarray) -> MarginResult:
    """The subset's margins, as the job's attacks would give them (the same radii)."""
    per_attack = {name: radii[rows] for name, radii in result.per_attack.items()}
    return MarginResult(
        result.radius[rows], result.success[rows], per_attack, result.censored_at[rows], result.norm
    )


def rule_spec(args: argparse.Namespace) -> ThresholdRuleSpec:
    target = args.target_tpr if args.threshold_rule == "target-tpr" else None
    return ThresholdRuleSpec(name=args.threshold_rule, target_tpr=target)


def fit_budgets(
    args: argparse.Namespace, fitted: Subset, grid: list[float], seed: int
) -> tuple[list[Budget], dict[float, Figures]]:
    """Each grid budget fitted as the job fits it: its answers as the service holds them, and
    the estimate's figures (a budget the job would refuse, a censored bound ≤ ε', is noted)."""
    budgets: list[Budget] = []
    figures: dict[float, Figures] = {}
    for eps in grid:
        rule = rule_at(rule_spec(args), eps, None)
        try:
            answer = fit_budget(
                eps, fitted, rule=rule, estimator=args.estimator, bootstrap=args.bootstrap,
                seed=seed,
            )  # fmt: skip
        except ValueError as error:  # Margins.robust: robustness unknown at eps
            figures[eps] = {"refused": str(error)}
            continue
        ra = answer.robust_accuracy
        budgets.append(
            Budget(eps, answer.threshold, answer.p_robust, answer.live_curve, ra.estimate)
        )
        figures[eps] = {
            "estimate": ra.estimate,
            "ci_low": ra.ci_low,
            "ci_high": ra.ci_high,
            "record_ece": answer.p_robust_ece,
        }
    return budgets, figures


def fit_seed(
    args: argparse.Namespace, points: Points, eps_grid: tuple[float, list[float]], seed: int
) -> Figures:
    """One calibration on seed's subset, as the job fits it (`eps_grid`: its ε and grid),
    answered by the service's code on every point outside the subset."""
    served_eps, grid = eps_grid
    subset = subset_indices(args.subset_size, len(points.scores), seed)
    held = np.setdiff1d(np.arange(len(points.scores)), subset)
    fitted = answer_points(
        take(points.result, subset),
        scores=points.scores[subset],
        correct=points.correct[subset],
        big_scores=points.scores,
        big_correct=points.correct,
        threshold_points=None,
    )
    budgets, figures = fit_budgets(args, fitted, grid, seed)
    try:
        quantiles: MarginQuantiles | None = margin_quantiles(fitted, served_eps, args.interval)
    except ValueError:  # robustness unknown at the served ε: the job would refuse the subset
        quantiles = None
    answers = Answers(tuple(budgets), 0, quantiles)  # evaluated as `ServedModel.predict` does
    scores = points.scores[held]
    held_margins = Margins(points.margins.value[held], points.margins.observed[held])
    for index, budget in enumerate(budgets):
        robust, known = robust_truth(held_margins, budget.eps)
        p = answers.p_robust(scores, index).astype(np.float64)[known]
        figures[budget.eps]["ece"] = expected_calibration_error(p, robust[known], args.bins)
        figures[budget.eps]["table"] = reliability_table(p, robust[known], args.bins)
    if quantiles is None:
        return {"budgets": figures, "interval": None}
    _, low, estimate, high = answers.served_answers(scores)
    interval = held_out_interval(low, high, held_margins) | median_error(estimate, held_margins)
    return {"budgets": figures, "interval": interval | {"record_coverage": quantiles.coverage}}


def budget_summary(runs: list[Figures], eps: float, points: Points, bins: int) -> Figures:
    """One grid budget over the seeds: the estimate's error against the truth, its interval's
    coverage, p_robust's held-out calibration error and the pooled reliability table."""
    rows = [run["budgets"][eps] for run in runs]
    done = [row for row in rows if "refused" not in row]
    low, high = truth_bracket(points.correct, points.margins, eps)
    head = {"eps": eps, "truth": (low + high) / 2, "truth_low": low, "truth_high": high,
            "seeds": len(done), "refused": len(rows) - len(done)}  # fmt: skip
    if not done:
        return head
    estimate = np.array([row["estimate"] for row in done])
    ci = np.array([(row["ci_low"], row["ci_high"]) for row in done], dtype=np.float64)  # None: nan
    error = np.maximum.reduce([low - estimate, estimate - high, np.zeros_like(estimate)])
    ece = np.array([row["ece"] for row in done])
    pooled = np.sum([row["table"] for row in done], axis=0)
    table = [
        {"bin": f"[{i / bins:.1f}, {(i + 1) / bins:.1f}]", "points": int(n),
         "mean_p": sum_p / n if n else None, "robust_share": sum_o / n if n else None}
        for i, (n, sum_p, sum_o) in enumerate(pooled.T)
    ]  # fmt: skip
    return head | {
        "ra_abs_error_points_mean": 100 * float(error.mean()),
        "ra_abs_error_points_max": 100 * float(error.max()),
        "ra_bias_points": 100 * float(np.mean(estimate - (low + high) / 2)),
        "ra_ci_coverage": float(np.mean((ci[:, 0] <= high) & (ci[:, 1] >= low))),
        "ra_ci_width_points_mean": 100 * float(np.nanmean(ci[:, 1] - ci[:, 0])),
        "ece_mean": float(ece.mean()),
        "ece_max": float(ece.max()),
        "ece_pooled": table_ece(pooled),
        "record_ece_mean": float(np.mean([row["record_ece"] for row in done])),
        "per_seed": [[row["estimate"], row["ci_low"], row["ci_high"]] for row in done],
        "reliability": table,
    }


def interval_summary(runs: list[Figures]) -> dict[str, float]:
    """The margin interval over the seeds it was fitted on: mean, min and max of each figure."""
    fitted = [run["interval"] for run in runs if run["interval"] is not None]
    keys = [key for key in fitted[0] if fitted[0][key] is not None] if fitted else []
    figures: dict[str, float] = {"seeds": len(fitted)}
    for key in keys:
        values = np.array([interval[key] for interval in fitted], dtype=np.float64)
        figures |= {f"{key}_mean": float(values.mean()), f"{key}_min": float(values.min()),
                    f"{key}_max": float(values.max())}  # fmt: skip
    return figures


def targets(
    budgets: list[Figures], interval: dict[str, float], args: argparse.Namespace
) -> dict[str, bool]:
    """Issue 20's targets, each met or not (seed means; the maxima are in the figures)."""
    fitted = [b for b in budgets if b["seeds"]]
    coverage = interval.get("coverage_mean", np.nan)
    everywhere = all(b["seeds"] == args.seeds for b in budgets) and interval["seeds"] == args.seeds
    return {
        "p_robust ECE <= 0.05 at every budget": all(b["ece_mean"] <= 0.05 for b in fitted),
        f"interval coverage within {args.interval:g} ± 0.1": abs(coverage - args.interval) <= 0.1,
        "RA error <= 1.0 point at every budget": all(
            b["ra_abs_error_points_mean"] <= 1.0 for b in fitted
        ),
        "RA 95 % CI coverage >= 0.9 at every budget": all(
            b["ra_ci_coverage"] >= 0.9 for b in fitted
        ),
        ">= 20 subsets, none refused": args.seeds >= 20 and everywhere,
    }


def print_interval(i: dict[str, float], level: float) -> None:
    if "coverage_mean" not in i:
        print("margin interval: refused on every seed")
        return
    print(
        f"margin interval ({level:.0%}): held-out coverage {i['coverage_mean']:.3f} "
        f"[{i['coverage_min']:.3f}, {i['coverage_max']:.3f}], below low "
        f"{i['below_low_mean']:.3f}, above high {i['above_high_mean']:.3f}; record says "
        f"{i.get('record_coverage_mean', float('nan')):.3f}; |median − r| mean "
        f"{i['median_abs_error_mean_mean']:.4f}, median {i['median_abs_error_median_mean']:.4f}"
    )


def print_figures(figures: Figures) -> None:
    print(f"{figures['version']}: ε = {figures['eps']:g}, {figures['points']} points, ", end="")
    print(f"{figures['seeds']} seeds × {figures['subset_size']}; {figures['machine_end']}")
    print(
        "  ε'     truth   |err| mean/max (pts)  bias   CI cov  CI width  "
        "ECE mean/max   ECE pooled  record ECE"
    )
    for b in figures["budgets"]:
        if not b["seeds"]:
            print(f"{b['eps']:7.4f}  {b['truth']:.4f}  refused on every seed")
            continue
        print(
            f"{b['eps']:7.4f}  {b['truth']:.4f}  {b['ra_abs_error_points_mean']:5.2f} / "
            f"{b['ra_abs_error_points_max']:5.2f}        {b['ra_bias_points']:+5.2f}  "
            f"{b['ra_ci_coverage']:5.0%}   {b['ra_ci_width_points_mean']:5.2f}    "
            f"{b['ece_mean']:.3f} / {b['ece_max']:.3f}  {b['ece_pooled']:.3f}       "
            f"{b['record_ece_mean']:.3f}"
        )
    print_interval(figures["interval"], figures["interval_level"])
    r = figures["runner_up"]
    if r["share"] is not None:
        print(
            f"runner-up = the adversarial class on {r['share']:.3f} of {r['flipped']} flipped "
            f"points, {r['share_within_eps']:.3f} of the {r['flipped_within_eps']} within ε; "
            f"within the top two other classes on {r['share_top2']:.3f}"
        )
    served = next(b for b in figures["budgets"] if b["eps"] == figures["eps"])
    print(f"reliability of p_robust at ε = {figures['eps']:g}, pooled over seeds:")
    for row in served.get("reliability", []):
        if row["points"]:
            print(
                f"  {row['bin']}: {row['points']:7d} points, mean p {row['mean_p']:.3f}, "
                f"robust {row['robust_share']:.3f}"
            )
    for name, met in figures["targets"].items():
        print(f"{'met    ' if met else 'MISSED '} {name}")


def main() -> None:
    args = parse_args()
    if args.seeds < 1 or args.bootstrap < 0 or not 0 < args.interval < 1:
        raise SystemExit("answers_fidelity: --seeds >= 1, --bootstrap >= 0, 0 < --interval < 1")
    machine_start = machine_state()
    folder = current_dir(args.store, args.model)
    record = read_record(folder)
    eps = record.threat_model.eps
    grid = sorted({*(args.eps_grid or (eps / 4, eps / 2, eps, 2 * eps)), eps})
    points = load_points(args, record, folder / ONNX_FILE)
    started = time.monotonic()
    runs = []
    for seed in range(args.seeds):
        runs.append(fit_seed(args, points, (eps, grid), seed))
        print(f"seed {seed}: {time.monotonic() - started:.0f} s", flush=True)
    budgets = [budget_summary(runs, budget, points, args.bins) for budget in grid]
    interval = interval_summary(runs)
    figures = {
        "model": args.model, "version": record.version, "eps": eps, "grid": grid,
        "points": len(points.scores), "clean_accuracy": float(points.correct.mean()),
        "censored": int((~points.margins.observed).sum()), "seeds": args.seeds,
        "subset_size": args.subset_size, "bootstrap": args.bootstrap,
        "estimator": args.estimator, "threshold_rule": args.threshold_rule,
        "interval_level": args.interval, "fit_seconds": time.monotonic() - started,
        "machine_start": machine_start, "machine_end": machine_state(), "budgets": budgets,
        "interval": interval, "runner_up": runner_up_share(points, eps),
        "targets": targets(budgets, interval, args),
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print_figures(figures)


if __name__ == "__main__":
    main()
