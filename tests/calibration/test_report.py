"""The HTML report: self-contained, escaped, and renders degenerate data without warnings."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

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
