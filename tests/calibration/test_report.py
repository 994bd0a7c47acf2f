"""The HTML report: self-contained, escaped, and renders degenerate data without warnings."""

from __future__ import annotations

import dataclasses
import html
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from marginwatch.artifact import store
from marginwatch.artifact.schema import CalibrationRecord, RobustAccuracyEstimate, ThresholdRuleSpec
from marginwatch.artifact.store import read_record
from marginwatch.artifact.traffic import Ratio, TrafficCheck
from marginwatch.calibration.margins import MarginResult
from marginwatch.calibration.record import report_data
from marginwatch.calibration.report import (
    ReportData,
    TrafficReport,
    render_report,
    render_traffic_section,
)
from marginwatch.calibration.report_fields import iso_utc_text, label
from marginwatch.calibration.verdict import (
    AUROC_FLOOR,
    AUROC_TARGET,
    TAU_FLOOR,
    TAU_TARGET,
    WIDTH_TARGET,
    Figures,
    judge,
)

PROJECT = Path(__file__).resolve().parents[2]
TITLE = 'cnn <script>alert("x")</script> & co'


def _data(n: int, seed: int, title: str = TITLE) -> ReportData:
    rng = np.random.default_rng(seed)
    margins = np.abs(rng.normal(0.1, 0.06, size=n))
    scores = 3.0 * margins + rng.normal(0, 0.1, size=n)
    success = rng.random(n) > 0.05
    margins[~success] = np.inf
    return ReportData(
        margins=margins,
        success=success,
        scores=scores,
        correct=rng.random(n) < 0.9,
        eps=0.1,
        threshold=0.3,
        title=title,
        summary={"robust accuracy": 0.71234, "notes": "<b>x</b>", "subset": n},
        headline={"model": "cnn", "version": "v1"},
    )


@pytest.fixture(scope="module")
def page() -> str:
    return render_report(_data(150, 0))


def test_report_is_self_contained(page: str) -> None:
    assert page.count('<img src="data:image/png;base64,') >= 3
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]*", "", page)  # payloads may spell http
    assert "http" not in text.lower()
    assert "url(" not in text and "<link" not in text and "<script" not in text


def test_report_escapes_strings(page: str) -> None:
    assert "<script>" not in page
    assert "cnn &lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; co" in page
    assert "&lt;b&gt;x&lt;/b&gt;" in page
    assert "0.7123" in page and "AUROC" in page and "Kendall τ" in page


def test_report_renders_degenerate_data() -> None:
    data = _data(20, 1, title="all robust")
    data = ReportData(
        margins=np.full(20, 0.5),
        success=np.ones(20, bool),
        scores=data.scores,
        correct=np.ones(20, bool),
        eps=0.1,
        threshold=0.0,
        title="all robust",
    )
    assert render_report(data).count("data:image/png;base64,") == 3


def test_numeric_modules_import_without_torch_or_matplotlib() -> None:
    code = (
        "import sys\n"
        "import marginwatch.calibration.metrics, marginwatch.calibration.threshold\n"
        "import marginwatch.calibration.estimators\n"
        "import marginwatch.calibration.report\n"
        "heavy = {'torch', 'matplotlib'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


def test_report_decides_nonrobustness_as_the_job_does() -> None:
    # a censored margin whose lower bound is at or below ε: robustness unknown, as in the job
    data = dataclasses.replace(
        _data(20, 2), margins=np.full(20, 0.05), success=np.r_[False, np.ones(19, bool)]
    )
    with pytest.raises(ValueError, match="censored"):
        render_report(data)


def _shipped() -> CalibrationRecord:
    """The shipped CURRENT version's record (a real one, every field filled in)."""
    return read_record(store.current_dir(PROJECT / "artifacts", "fmnist-cnn-pgd"))


def _record_data(record: CalibrationRecord, *, consistent: bool = True) -> ReportData:
    """The record with per-point arrays of its subset's size: scores that follow the margins
    (consistent) or do not."""
    rng = np.random.default_rng(0)
    n = record.subset.size
    margins = rng.uniform(0.0, 3 * record.threat_model.eps, size=n)
    result = MarginResult(
        radius=margins,
        success=np.ones(n, bool),
        per_attack={"fmn": margins},
        censored_at=np.ones(n),
        norm=np.inf,
    )
    scores = 2 * margins if consistent else rng.permutation(2 * margins)
    return report_data(record, result, scores, rng.random(n) < 0.85)


def _text(page: str) -> str:
    """What a person reads: the page without its style, images and tags."""
    page = re.sub(r"<style>.*?</style>|<img [^>]*>", "", page, flags=re.DOTALL)
    return html.unescape(re.sub(r"<[^>]+>", " ", page))


def _significant_digits(number: str) -> int:
    mantissa = number.split("e", maxsplit=1)[0].replace(".", "").lstrip("0")
    return len(mantissa)


def _assert_for_people(text: str) -> None:
    assert "{'" not in text and '{"' not in text and "': " not in text  # no dict text
    # a version id (`20261207T092712.414Z`) holds a decimal point but is no figure
    text = re.sub(r"\d{8}T\d{6}(?:\.\d{3})?Z(?:-\d{3})?", "<version>", text)
    floats = re.findall(r"\d+\.\d+(?:e[+-]?\d+)?", text)
    assert floats and all(_significant_digits(f) <= 6 for f in floats), [
        f for f in floats if _significant_digits(f) > 6
    ]
    assert not re.findall(r"\b\d{10}(?:\.\d+)?\b", text)  # no raw Unix seconds


def test_the_record_reads_for_people() -> None:
    record = _shipped()
    text = _text(render_report(_record_data(record)))
    _assert_for_people(text)
    assert (
        iso_utc_text(record.created_at).endswith(" UTC") and iso_utc_text(record.created_at) in text
    )
    # the verdict first, then the figures; count and regression explained; the score choice
    assert text.index("Verdict:") < text.index("attacked points") < text.index("Robust accuracy")
    assert "The paper's estimator" in text and "isotonic" in text
    assert "Score choice" in text and "Recorded reason" in text
    assert record.pseudo_margin is not None and record.pseudo_margin.choice is not None
    assert record.pseudo_margin.choice.reason in text
    for key in CalibrationRecord.model_fields:  # every field, under a readable label
        assert label(key) in text, key


def test_the_traffic_check_reads_for_people() -> None:
    record = _shipped()
    ratio = Ratio(value=0.2, ci_low=0.11934567890123, ci_high=0.3, count=4, total=20)
    check = TrafficCheck(
        model_name=record.model_name,
        version=record.version,
        created_at="2026-12-02T10:00:00Z",
        traffic_since=1796624021.25,
        traffic_until=1796710421.5,
        available_points=12345,
        seed=3141592653,
        threat_model=record.threat_model,
        attacks=record.attacks,
        censored=0,
        nonrobust=ratio,
        flagged=ratio,
        recall=0.75,
        precision=0.59949000000000001,
        false_positive_rate=None,
        kendall_tau=0.6123456789,
        auroc=None,
        live_gauge=0.7,
        ratios_agree=True,
        duration_s=83.25,
    )
    rng = np.random.default_rng(1)
    margins = rng.uniform(0.0, 0.3, size=20)
    section = render_traffic_section(
        TrafficReport(
            check=check,
            margins=margins,
            success=np.ones(20, bool),
            scores=margins,
            brittle=margins < 0.1,
            threshold=0.1,
        )
    )
    text = _text(section)
    _assert_for_people(text)
    assert "2026-12-07 06:13:41 UTC" in text and "1 min 23 s" in text


def test_the_verdict_follows_the_figures() -> None:
    record = _shipped()
    consistent = _text(render_report(_record_data(record)))
    inconsistent = _text(render_report(_record_data(record, consistent=False)))
    wide = record.model_copy(
        update={"robust_accuracy": record.robust_accuracy.model_copy(update={"ci_low": 0.5})}
    )
    imprecise = _text(render_report(_record_data(wide)))
    assert "Verdict: trustworthy" in consistent
    assert "Verdict: not trustworthy" in inconsistent
    width = 100 * (record.robust_accuracy.ci_high - 0.5)  # type: ignore[operator]
    assert "Verdict: usable with care" in imprecise
    assert f"interval is {width:.1f} points wide" in imprecise


@pytest.mark.parametrize(
    ("figures", "level"),
    [
        (Figures(TAU_TARGET, AUROC_TARGET, WIDTH_TARGET, 0, 100), "trustworthy"),
        (Figures(TAU_TARGET, AUROC_TARGET, None, 0, 100), "usable with care"),
        (Figures(TAU_FLOOR, AUROC_TARGET, 0.01, 0, 100), "usable with care"),
        (Figures(0.9, AUROC_FLOOR - 0.01, 0.01, 0, 100), "not trustworthy"),
        (Figures(0.9, 0.99, 0.01, 3, 100), "usable with care"),
        (Figures(0.9, 0.99, 0.01, 11, 100), "not trustworthy"),
        (Figures(float("nan"), 0.99, 0.01, 0, 100), "not trustworthy"),
    ],
    ids=["at-targets", "no-interval", "tau-at-floor", "auroc-below-floor", "some-censored",
         "many-censored", "nan-tau"],
)  # fmt: skip
def test_the_verdict_rule(figures: Figures, level: str) -> None:
    verdict = judge(figures)
    assert verdict.level == level
    assert len(verdict.reasons) == 4 and f"{figures.kendall_tau:.3f}" in verdict.reasons[0]


def test_report_shows_the_record_as_the_cli_does() -> None:
    record = _shipped()
    rule = ThresholdRuleSpec(name="target-tpr", target_tpr=0.9)
    point_only = RobustAccuracyEstimate(
        method="count", estimate=0.5, ci_low=None, ci_high=None, bootstrap=0
    )
    record = record.model_copy(
        update={"threshold_rule": rule, "robust_accuracy_estimates": [point_only]}
    )
    data = _record_data(record)
    estimate = record.robust_accuracy
    shown = f"{estimate.estimate:.3f} [{estimate.ci_low:.3f}, {estimate.ci_high:.3f}]"
    assert data.headline["robust accuracy (regression)"] == shown
    text = _text(render_report(data))
    assert "target-tpr@0.9" in text  # the rule's display form, not the spec's fields
    assert "0.5 none (no bootstrap)" in " ".join(text.split())  # no interval to show
