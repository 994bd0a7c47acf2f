"""The report's plain-language verdict: can the brittleness flag be trusted for this model?

One rule, here only, on four figures of the attacked subset, each against named thresholds:

* Kendall τ between input margin and score (margin consistency, the paper's premise): the flag
  is only as good as the score's ranking of inputs by their distance to the boundary;
* AUROC of the score for the non-robust points at ε: how well λ can separate them;
* the width of the served robust-accuracy estimate's 95 % bootstrap interval: how much the
  subset's size leaves the estimate (and λ) to chance;
* the share of censored points (every attack failed): their margins are only lower bounds, so
  the figures above rest on guesses for them.

A figure past its floor (ceiling) makes the flag not trustworthy; one short of its target makes
it usable with care; otherwise it is trustworthy. The thresholds are judgement calls, named here
so that the report can state them and a change is one edit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "AUROC_FLOOR",
    "AUROC_TARGET",
    "CENSORED_CEILING",
    "CENSORED_TARGET",
    "TAU_FLOOR",
    "TAU_TARGET",
    "WIDTH_TARGET",
    "Figures",
    "Verdict",
    "judge",
    "rule_text",
]

TAU_TARGET = 0.5
"""Kendall τ from which the score ranks inputs like their margins (the paper's consistent
robust models lie above it)."""
TAU_FLOOR = 0.3
"""Below it the score barely follows the margin: the flag is close to guessing."""
AUROC_TARGET = 0.9
"""AUROC from which λ separates non-robust from robust points well."""
AUROC_FLOOR = 0.8
"""Below it one flag in several is wrong at any λ."""
WIDTH_TARGET = 0.10
"""Widest 95 % interval of the robust-accuracy estimate (10 points) called precise."""
CENSORED_TARGET = 0.02
"""Largest share of censored subset points that leaves the figures essentially measured."""
CENSORED_CEILING = 0.10
"""Above it too many margins are guesses for the figures to be trusted."""

Level = Literal["trustworthy", "usable with care", "not trustworthy"]


@dataclass(frozen=True)
class Figures:
    """What the verdict is decided on; `interval_width` is None without a bootstrap interval."""

    kendall_tau: float
    auroc: float
    interval_width: float | None
    censored: int
    points: int


@dataclass(frozen=True)
class Verdict:
    """`level`, a one-sentence `summary`, and one `reasons` line per figure, with its number."""

    level: Level
    summary: str
    reasons: tuple[str, ...]


def _grade(value: float, target: float, floor: float | None, *, higher_is_better: bool) -> int:
    """0: meets the target; 1: short of it; 2: beyond the floor. NaN counts as beyond."""
    if math.isnan(value):
        return 2
    sign = 1.0 if higher_is_better else -1.0
    if sign * value >= sign * target:
        return 0
    return 2 if floor is not None and sign * value < sign * floor else 1


def _reasons(figures: Figures) -> list[tuple[int, str]]:
    """Each figure's grade (see `_grade`) and its line, number and thresholds included."""
    tau, auroc = figures.kendall_tau, figures.auroc
    share = figures.censored / figures.points if figures.points else math.nan
    width = figures.interval_width
    return [
        (
            _grade(tau, TAU_TARGET, TAU_FLOOR, higher_is_better=True),
            f"the score follows the inputs' distance to the decision boundary {_tau_words(tau)} "
            f"(Kendall τ = {tau:.3f}; target ≥ {TAU_TARGET:g}, floor {TAU_FLOOR:g})",
        ),
        (
            _grade(auroc, AUROC_TARGET, AUROC_FLOOR, higher_is_better=True),
            f"it separates non-robust from robust points {_auroc_words(auroc)} (AUROC = "
            f"{auroc:.3f}; target ≥ {AUROC_TARGET:g}, floor {AUROC_FLOOR:g})",
        ),
        (
            1 if width is None else _grade(width, WIDTH_TARGET, None, higher_is_better=False),
            "the robust-accuracy estimate has no interval (run with --bootstrap above 0)"
            if width is None
            else f"the robust-accuracy estimate's 95 % interval is {100 * width:.1f} points wide "
            f"(target ≤ {100 * WIDTH_TARGET:g})",
        ),
        (
            _grade(share, CENSORED_TARGET, CENSORED_CEILING, higher_is_better=False),
            f"{figures.censored} of {figures.points} subset points are censored, that is no "
            f"attack flipped them and their margin is only a lower bound ({100 * share:.1f} %; "
            f"target ≤ {100 * CENSORED_TARGET:g} %, ceiling {100 * CENSORED_CEILING:g} %)",
        ),
    ]


def _tau_words(tau: float) -> str:
    return "closely" if tau >= TAU_TARGET else "loosely" if tau >= TAU_FLOOR else "hardly"


def _auroc_words(auroc: float) -> str:
    return "well" if auroc >= AUROC_TARGET else "fairly" if auroc >= AUROC_FLOOR else "poorly"


def _figures(count: int) -> str:
    return "1 figure is" if count == 1 else f"{count} figures are"


def judge(figures: Figures) -> Verdict:
    """The verdict on `figures` (see the module docstring for the rule)."""
    graded = _reasons(figures)
    worst = max(grade for grade, _ in graded)
    mark = ("✓", "!", "✗")
    reasons = tuple(f"{mark[grade]} {text}" for grade, text in graded)
    if worst == 0:
        return Verdict(
            "trustworthy",
            "The flag can be trusted for this model: every figure below meets its target.",
            reasons,
        )
    failing = sum(grade == 2 for grade, _ in graded)
    short = sum(grade == 1 for grade, _ in graded)
    if worst == 1:
        return Verdict(
            "usable with care",
            f"The flag is usable with care: {_figures(short)} short of the target (marked "
            "!); read the flagged/unflagged split as indicative, not exact.",
            reasons,
        )
    return Verdict(
        "not trustworthy",
        f"Do not rely on the flag for this model: {_figures(failing)} past the floor (marked "
        "✗). Consider more attack steps, a larger subset, or a learned pseudo-margin.",
        reasons,
    )


def rule_text() -> str:
    """The rule in one paragraph, with the thresholds in force."""
    return (
        f"Not trustworthy when Kendall τ < {TAU_FLOOR:g}, AUROC < {AUROC_FLOOR:g} or more than "
        f"{100 * CENSORED_CEILING:g} % of the subset is censored; usable with care when "
        f"τ < {TAU_TARGET:g}, AUROC < {AUROC_TARGET:g}, the estimate's 95 % interval is wider "
        f"than {100 * WIDTH_TARGET:g} points (or absent), or more than "
        f"{100 * CENSORED_TARGET:g} % is censored; trustworthy otherwise."
    )
