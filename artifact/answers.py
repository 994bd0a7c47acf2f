"""The robustness answers beyond the flag, evaluated beside the flag rule (`flags.py`): for each
prediction, at a budget ε' of the calibration's grid, λ(ε') and so `brittle`, the calibrated
probability `p_robust` = P(margin > ε' | score), the margin's estimate and interval (conditional
quantiles of the margin given the score), and the runner-up class. All of it is the record's
plain arrays evaluated in numpy on the served score and logits: no model run, no attack.

`Answers` is built once per loaded version (`answers_of`); a record written before the grid
existed has one budget, its served ε, and no `p_robust` or margin curves (None).
Pure numpy, no torch: the service imports it.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from marginwatch.artifact.schema import CalibrationRecord, Curve, MarginQuantiles

__all__ = ["Answers", "Budget", "BudgetNotInGrid", "answers_of", "format_grid", "runner_up"]

# A requested budget matches a grid budget within this relative tolerance: JSON's `0.1` and the
# float the job computed as ε/4 · 4 may differ in the last bits.
EPS_RTOL = 1e-6


SMALL_ROW = 64  # classes up to which one row's runner-up is found in Python floats


class BudgetNotInGrid(ValueError):
    """A request asked for a budget the calibration did not fit."""


@dataclass(frozen=True)
class Budget:
    """One budget of the grid, as the service evaluates it."""

    eps: float
    threshold: float
    p_robust: Curve | None  # None: a record from before the grid
    live_curve: Curve
    robust_accuracy: float  # the calibration's estimate at this budget


class CurveTable:
    """Piecewise-linear curves on one set of knots (the union of their own, so each is exact),
    flat beyond them, evaluated together: the served answers are four curves of one score, and
    one knot search serves them all. A batch of one, the latency-bound case, is evaluated in
    Python floats: a numpy call costs about a microsecond whatever its size, and the answers'
    few calls would otherwise cost more than the flag itself (docs/benchmarks.md)."""

    def __init__(self, curves: list[tuple[np.ndarray, np.ndarray]]) -> None:
        knots = np.unique(np.concatenate([x for x, _ in curves]))
        if knots.size == 1:  # one knot: constant curves; a second knot keeps the search simple
            knots = np.r_[knots, knots[0] + 1.0]
        self._x = knots
        self._rows = np.stack([np.interp(knots, x, y) for x, y in curves])
        self._x_list: list[float] = knots.tolist()
        self._rows_list: list[list[float]] = self._rows.tolist()

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        """Every curve at `scores`: shape (curves, n), float32 (the outputs' datatype)."""
        if len(scores) == 1:
            return self._one(float(scores[0]))
        return np.stack([np.interp(scores, self._x, row) for row in self._rows]).astype(np.float32)

    def _one(self, score: float) -> np.ndarray:
        x = self._x_list
        i = min(max(bisect.bisect_right(x, score), 1), len(x) - 1)
        x0, x1 = x[i - 1], x[i]
        w = min(max((score - x0) / (x1 - x0), 0.0), 1.0)  # NaN stays NaN: min/max keep it
        values = [[row[i - 1] + (row[i] - row[i - 1]) * w] for row in self._rows_list]
        return np.array(values, dtype=np.float32)


@dataclass(frozen=True)
class Answers:
    """A version's budget grid (increasing ε'), which of them is served by default, and the
    margin quantiles (None for older records)."""

    budgets: tuple[Budget, ...]
    served: int
    margin: MarginQuantiles | None

    @cached_property
    def _served_table(self) -> CurveTable | None:
        """p_robust at the served budget, then the margin's low, middle and high quantiles."""
        served = self.budgets[self.served].p_robust if self.budgets else None
        if served is None or self.margin is None:
            return None
        x = np.asarray(self.margin.knots_x, dtype=np.float64)
        rows = np.asarray(self.margin.knots_y, dtype=np.float64)
        curves = [(np.asarray(served.knots_x), np.asarray(served.knots_y))]
        curves += [(x, rows[0]), (x, rows[len(rows) // 2]), (x, rows[-1])]
        return CurveTable(curves)

    def served_answers(self, scores: np.ndarray) -> np.ndarray:
        """p_robust at the served budget, and the margin's low, estimate and high, at `scores`:
        shape (4, n), float32; NaN where the record has no curves (an older record)."""
        table = self._served_table
        if table is None:
            return np.full((4, len(scores)), np.nan, dtype=np.float32)
        return table(scores)

    @property
    def grid(self) -> list[float]:
        return [budget.eps for budget in self.budgets]

    def budget_index(self, eps: float | None) -> int:
        """The grid index of `eps` (None: the served budget); `BudgetNotInGrid` off the grid."""
        if eps is None:
            return self.served
        grid = np.asarray(self.grid)
        matches = np.flatnonzero(np.isclose(grid, eps, rtol=EPS_RTOL, atol=0.0))
        if matches.size != 1:
            raise BudgetNotInGrid(
                f"eps {eps:g} is not in this version's budget grid {format_grid(self.grid)}: "
                "ask for one of those, or leave eps out for the served budget "
                f"{self.budgets[self.served].eps:g}"
            )
        return int(matches[0])

    def p_robust(self, scores: np.ndarray, index: int) -> np.ndarray:
        """P(margin > ε' | score) at budget `index`; NaN where the record has no curve."""
        curve = self.budgets[index].p_robust
        if curve is None:
            return np.full(np.shape(scores), np.nan, dtype=np.float32)
        return curve(scores).astype(np.float32)


def answers_of(record: CalibrationRecord) -> Answers:
    """The record's grid and curves; for an older record, its served ε alone."""
    if record.budgets is None:
        served = Budget(
            record.threat_model.eps,
            record.threshold,
            None,
            record.live_curve,
            record.robust_accuracy.estimate,
        )
        return Answers((served,), 0, record.margin_quantiles)
    budgets = tuple(
        Budget(b.eps, b.threshold, b.p_robust, b.live_curve, b.robust_accuracy.estimate)
        for b in record.budgets
    )
    served_index = next(i for i, b in enumerate(record.budgets) if b.eps == record.threat_model.eps)
    return Answers(budgets, served_index, record.margin_quantiles)


def runner_up(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The class each decision is closest to flipping to: the highest logit but the label's
    (a tie at the top gives the other tied class, never the label itself)."""
    if len(logits) == 1 and logits.shape[1] <= SMALL_ROW:
        row = logits[0].tolist()  # Python floats: cheaper than numpy calls on one short row
        row[int(labels[0])] = -math.inf
        return np.array([row.index(max(row))])
    others = np.array(logits, dtype=np.float32, copy=True)
    others[np.arange(len(others)), labels] = -np.inf
    return others.argmax(axis=1)


def format_grid(grid: list[float]) -> str:
    """``[0.025, 0.05, 0.1, 0.2]``: a grid as messages and metadata show it."""
    return "[" + ", ".join(f"{eps:g}" for eps in grid) + "]"
