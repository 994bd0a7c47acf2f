"""The report's robustness answers: robust accuracy over the budget grid, the reliability of
p_robust and the margin interval's coverage, shown for people; "not recorded" for older records."""

from __future__ import annotations

import dataclasses
import html
import re
from pathlib import Path

import numpy as np
import pytest

from marginwatch.artifact import store
from marginwatch.artifact.schema import CalibrationRecord, RobustAccuracyEstimate
from marginwatch.artifact.store import read_record
from marginwatch.calibration.answer_figures import reliability_bins
from marginwatch.calibration.answers import (
    Margins,
    Subset,
    budget_answers,
    expected_calibration_error,
)
from marginwatch.calibration.margins import MarginResult
from marginwatch.calibration.record import margin_quantiles, report_data
from marginwatch.calibration.report import ReportData, render_report
from marginwatch.calibration.report_fields import number_text

PROJECT = Path(__file__).resolve().parents[2]
SECTIONS = ("Robust accuracy vs budget", "Reliability of p_robust", "Margin interval")
IMAGE = '<img src="data:image/png;base64,'
# many digits each, so that a figure shown unrounded is caught
ESTIMATES = (
    (0.81234567, 0.79111111, 0.83999999),
    (0.76543219, 0.74012345, 0.78987654),
    (0.70464482, 0.68166211, 0.72433892),
    (0.40123456, 0.36987654, 0.43210987),
)


def _shipped() -> CalibrationRecord:
    """The shipped version's record: older than the grid (no budgets, no margin quantiles)."""
    return read_record(store.current_dir(PROJECT / "artifacts", "fmnist-cnn-pgd"))


def _subset(record: CalibrationRecord) -> tuple[MarginResult, np.ndarray, np.ndarray]:
    """Margins, scores that follow them, correctness; the largest margins censored, their
    bounds past 2ε."""
    rng = np.random.default_rng(0)
    n, eps = record.subset.size, record.threat_model.eps
    true = rng.uniform(0.0, 3 * eps, size=n)
    success = true < 2.8 * eps
    radius = np.where(success, true, np.inf)
    result = MarginResult(
        radius=radius,
        success=success,
        per_attack={"fmn": radius},
        censored_at=np.full(n, 1.0),
        norm=np.inf,
    )
    scores = 2 * true + rng.normal(0.0, 0.05, size=n)
    return result, scores, rng.random(n) < 0.85


def _with_answers(
    record: CalibrationRecord, result: MarginResult, scores: np.ndarray, correct: np.ndarray
) -> CalibrationRecord:
    """`record` with a budget grid (ε/4 … 2ε) and margin quantiles fitted on the arrays, as
    the job fits them."""
    eps = record.threat_model.eps
    margins = Margins.of(result.radius, result.success, result.censored_at)
    subset = Subset(scores, correct, margins, scores, margins, scores, correct)
    budgets = [
        budget_answers(
            budget,
            subset,
            threshold=record.threshold if budget == eps else 0.5 * budget,
            estimate=RobustAccuracyEstimate(
                method="regression", estimate=point, ci_low=low, ci_high=high, bootstrap=20
            ),
        )
        for budget, (point, low, high) in zip(
            (eps / 4, eps / 2, eps, 2 * eps), ESTIMATES, strict=True
        )
    ]
    fields = record.model_dump()
    fields["budgets"] = [budget.model_dump() for budget in budgets]
    fields["margin_quantiles"] = margin_quantiles(subset, eps, 0.8).model_dump()
    return CalibrationRecord.model_validate(fields)


@pytest.fixture(scope="module")
def answered() -> tuple[CalibrationRecord, ReportData, str]:
    result, scores, correct = _subset(_shipped())
    record = _with_answers(_shipped(), result, scores, correct)
    data = report_data(record, result, scores, correct)
    return record, data, render_report(data)


def _text(page: str) -> str:
    """What a person reads: the page without its style, images and tags."""
    page = re.sub(r"<style>.*?</style>|<img [^>]*>", "", page, flags=re.DOTALL)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page)).split())


def _section(page: str, title: str) -> str:
    start = page.index(f"<h2>{html.escape(title)}</h2>")
    return page[start : page.index("</section>", start)]


def test_the_answers_have_their_sections_with_images(
    answered: tuple[CalibrationRecord, ReportData, str],
) -> None:
    _, _, page = answered
    text = _text(page)
    assert "Not recorded" not in text and "not recorded" not in text
    # the RA-vs-budget plot, the reliability diagram, the quantile plot, each in its section
    for title in SECTIONS:
        assert _section(page, title).count(IMAGE) == 1, title
    assert page.count(IMAGE) == 6  # and the three plots of the flag
    assert text.index("Verdict:") < text.index("Robust accuracy vs budget")
    assert text.index("Margin interval") < text.index("Everything recorded")


def test_the_grid_reads_rounded(answered: tuple[CalibrationRecord, ReportData, str]) -> None:
    record, _, page = answered
    table = _text(_section(page, SECTIONS[0]))
    assert record.budgets is not None
    for budget, (point, low, high) in zip(record.budgets, ESTIMATES, strict=True):
        estimate = f"{number_text(point)} [{number_text(low)}, {number_text(high)}]"
        assert estimate in table and str(point) not in table
        assert number_text(budget.threshold) in table
        assert number_text(budget.subset_nonrobust) in table
        assert budget.p_robust_ece is not None and number_text(budget.p_robust_ece) in table
    assert "0.1 (served)" in table and "0.2 " in table and "0.025 " in table
    shown = " ".join(_text(_section(page, title)) for title in SECTIONS)
    numbers = re.findall(r"\d+\.\d+", shown)
    assert numbers and all(len(n.replace(".", "").lstrip("0")) <= 4 for n in numbers), numbers


def test_the_checks_agree_with_the_record(
    answered: tuple[CalibrationRecord, ReportData, str],
) -> None:
    """The page recomputes the cross-fitted checks from the subset's arrays: the same folds as
    the job's, so the same ECE and coverage the record holds."""
    record, _, page = answered
    served = next(b for b in (record.budgets or []) if b.eps == record.threat_model.eps)
    assert served.p_robust_ece is not None and record.margin_quantiles is not None
    reliability = _text(_section(page, SECTIONS[1]))
    assert f"Expected calibration error: {number_text(served.p_robust_ece)}" in reliability
    coverage = _text(_section(page, SECTIONS[2]))
    assert record.margin_quantiles.coverage is not None
    assert f"out-of-fold coverage {number_text(100 * record.margin_quantiles.coverage)} %" in (
        coverage
    )
    assert "nominal coverage 80 %" in coverage and "points judged" in coverage


def test_an_old_record_says_not_recorded() -> None:
    older = {"budgets": None, "margin_quantiles": None, "predicted_class_counts": None}
    record = _shipped().model_copy(update=older)  # as written before the grid
    result, scores, correct = _subset(record)
    page = render_report(report_data(record, result, scores, correct))
    for title in SECTIONS:
        assert "Not recorded" in _text(_section(page, title)), title
    assert page.count(IMAGE) == 3  # the flag's plots only
    assert "budget grid not recorded (an older record" in _text(page)


def test_without_the_censored_bounds_the_checks_are_not_shown(
    answered: tuple[CalibrationRecord, ReportData, str],
) -> None:
    _, data, _ = answered
    page = render_report(dataclasses.replace(data, censored_at=None))
    for title in SECTIONS[1:]:
        assert "Not shown: the censored points' bounds" in _text(_section(page, title))
    assert _section(page, SECTIONS[0]).count(IMAGE) == 1  # the grid is the record's own


def test_reliability_bins_are_the_eces() -> None:
    rng = np.random.default_rng(3)
    p = rng.random(400) ** 2
    outcome = rng.random(400) < p
    bins = reliability_bins(p, outcome)
    assert bins.count.sum() == 400 and np.all(bins.count > 0)
    assert np.all((bins.lower <= bins.predicted) & (bins.predicted <= bins.lower + 0.1))
    gap = np.sum(bins.count * np.abs(bins.predicted - bins.observed)) / 400
    assert gap == pytest.approx(expected_calibration_error(p, outcome))
