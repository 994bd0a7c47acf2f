"""The pure parts of `bench/answers_fidelity.py` on synthetic data with a known answer: the
ground truth's censoring, the calibration error and its reliability table, the interval's
coverage, the runner-up share, and one seed's fits end to end. No attack, no timing: the bench's
figures themselves are measured on the shipped model and recorded in docs/benchmarks.md."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from marginwatch.calibration.answers import (
    Margins,
    expected_calibration_error,
    reliability_table,
    table_ece,
)
from marginwatch.calibration.margins import MarginResult

BENCH = Path(__file__).resolve().parents[2] / "bench" / "answers_fidelity.py"
EPS = 0.1
GRID = [EPS / 4, EPS / 2, EPS, 2 * EPS]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    """The bench script as a module (bench/ is no package)."""
    spec = importlib.util.spec_from_file_location("answers_fidelity", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_truth_reads_a_censored_bound_as_robust_only_below_it(bench: ModuleType) -> None:
    # observed 0.05 and 0.2; censored at bounds 0.08 (unknown at 0.1) and 0.3 (robust at 0.1)
    margins = Margins(np.array([0.05, 0.2, 0.08, 0.3]), np.array([True, True, False, False]))
    robust, known = bench.robust_truth(margins, 0.1)
    assert robust.tolist() == [False, True, False, True]
    assert known.tolist() == [True, True, False, True]
    correct = np.array([True, True, True, False])
    assert bench.truth_bracket(correct, margins, 0.1) == (0.25, 0.5)
    assert bench.truth_bracket(correct, margins, 0.01) == (0.75, 0.75)  # all known robust


def test_calibration_error_is_small_for_calibrated_and_large_for_shifted_p() -> None:
    """The reliability table the bench pools over seeds (`calibration.answers`'s)."""
    rng = np.random.default_rng(0)
    p = rng.random(50_000)
    outcome = rng.random(p.size) < p  # calibrated by construction
    table = reliability_table(p, outcome, 10)
    assert table[0].sum() == p.size
    assert table_ece(table) == pytest.approx(expected_calibration_error(p, outcome, 10))
    assert table_ece(table) < 0.01
    shifted = np.clip(p + 0.2, 0.0, 1.0)  # overconfident by 0.2 below 0.8
    assert table_ece(reliability_table(shifted, outcome, 10)) > 0.15


def test_interval_coverage_of_true_quantiles_and_censored_points(bench: ModuleType) -> None:
    rng = np.random.default_rng(1)
    value = rng.exponential(0.1, 40_000)
    low = np.full(value.size, 0.1 * -np.log(0.9))  # the exponential's 10 % and 90 % quantiles
    high = np.full(value.size, 0.1 * -np.log(0.1))
    figures = bench.held_out_interval(low, high, Margins(value, np.ones(value.size, bool)))
    assert figures["coverage"] == pytest.approx(0.8, abs=0.01)
    assert figures["below_low"] == pytest.approx(0.1, abs=0.01)
    assert figures["above_high"] == pytest.approx(0.1, abs=0.01)
    # a censored bound at or above high is inside; one below high is unknown and left out
    margins = Margins(np.array([0.5, 2.0, 3.0, 1.0]), np.array([True, True, False, False]))
    two = bench.held_out_interval(np.zeros(4), np.full(4, 2.5), margins)
    assert two["coverage"] == pytest.approx(1.0)
    errors = bench.median_error(np.full(4, 1.0), margins)
    assert errors["median_abs_error_mean"] == pytest.approx(0.75)  # |1 − 0.5|, |1 − 2|


def synthetic_points(bench: ModuleType, size: int = 3000) -> Any:  # bench.Points
    """Margins that grow with the score (log-normal around 0.1·e^{0.8 s}), accuracy rising with
    it, 5 % censored at bounds between ε and 2ε; logits whose runner-up is class (label + 1)."""
    rng = np.random.default_rng(2)
    scores = rng.normal(size=size)
    radius = 0.1 * np.exp(0.8 * scores + 0.3 * rng.normal(size=size))
    censored = rng.random(size) < 0.05
    bound = rng.uniform(1.2 * EPS, 1.8 * EPS, size)
    result = MarginResult(
        radius=np.where(censored, np.inf, radius),
        success=~censored,
        per_attack={"fmn": np.where(censored, np.inf, radius)},
        censored_at=np.where(censored, bound, 1.0),
        norm=float("inf"),
    )
    labels = rng.integers(0, 10, size)
    logits = rng.normal(size=(size, 10)).astype(np.float32)
    logits[np.arange(size), labels] = 10.0
    logits[np.arange(size), (labels + 1) % 10] = 9.0
    adv = np.where(rng.random(size) < 0.75, (labels + 1) % 10, (labels + 2) % 10)
    correct = rng.random(size) < 1 / (1 + np.exp(-(2 * scores + 1.5)))
    margins = Margins.of(result.radius, result.success, result.censored_at)
    return bench.Points(logits, scores, labels, correct, result, margins, adv)


def test_runner_up_share_counts_flipped_points(bench: ModuleType) -> None:
    points = synthetic_points(bench)
    figures = bench.runner_up_share(points, EPS)
    flipped = points.result.success  # every adversarial class differs from the label
    assert figures["flipped"] == int(flipped.sum())
    expected = np.mean((points.adv_labels == (points.labels + 1) % 10)[flipped])
    assert figures["share"] == pytest.approx(expected)
    assert figures["share_top2"] > figures["share"]


def test_seeds_fit_as_the_job_and_refuse_a_budget_above_a_censored_bound(bench: ModuleType) -> None:
    points = synthetic_points(bench)
    args = argparse.Namespace(
        subset_size=400, estimator="regression", bootstrap=30, threshold_rule="match-fraction",
        target_tpr=0.95, interval=0.8, bins=10, seeds=2,
    )  # fmt: skip
    runs = [bench.fit_seed(args, points, (EPS, GRID), seed) for seed in range(2)]
    budgets = [bench.budget_summary(runs, eps, points, args.bins) for eps in GRID]
    interval = bench.interval_summary(runs)
    # 2ε lies above some censored bounds: every subset holds one, so the job refuses that budget
    assert budgets[-1]["seeds"] == 0 and budgets[-1]["refused"] == 2
    assert budgets[-1]["truth_low"] < budgets[-1]["truth_high"]
    for budget in budgets[:-1]:
        assert budget["seeds"] == 2
        assert budget["ra_abs_error_points_max"] < 5.0
        assert budget["ece_max"] < 0.06
        assert sum(row["points"] for row in budget["reliability"]) == 2 * (3000 - 400)
    assert interval["seeds"] == 2
    assert interval["coverage_mean"] == pytest.approx(0.8, abs=0.06)
    met = bench.targets(budgets, interval, args)
    assert not met[">= 20 subsets, none refused"]
