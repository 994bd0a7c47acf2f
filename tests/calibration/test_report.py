"""The HTML report: self-contained, escaped, and renders degenerate data without warnings."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from marginwatch.artifact.schema import RobustAccuracyEstimate, ThresholdRuleSpec
from marginwatch.artifact.store import read_record
from marginwatch.calibration.margins import MarginResult
from marginwatch.calibration.record import report_data
from marginwatch.calibration.report import ReportData, render_report

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


def test_report_shows_the_record_as_the_cli_does() -> None:
    shipped = Path(__file__).parents[2] / "artifacts" / "fmnist-cnn-pgd" / "20261125T192841Z"
    record = read_record(shipped)
    rule = ThresholdRuleSpec(name="target-tpr", target_tpr=0.9)
    point_only = RobustAccuracyEstimate(
        method="count", estimate=0.5, ci_low=None, ci_high=None, bootstrap=0
    )
    record = record.model_copy(
        update={"threshold_rule": rule, "robust_accuracy_estimates": [point_only]}
    )
    radius = np.array([0.05, np.inf])
    margins = MarginResult(
        radius=radius,
        success=np.isfinite(radius),
        per_attack={"fmn": radius},
        censored_at=np.ones(2),
        norm=np.inf,
    )
    data = report_data(record, margins, np.array([0.1, 0.9]), np.array([True, True]))
    assert data.summary["threshold_rule"] == "target-tpr@0.9"  # not the spec's dict
    assert data.summary["robust accuracy, count"] == "0.5000"  # no interval to show
    assert data.headline["robust accuracy (regression)"] == "0.703 [0.684, 0.724]"
