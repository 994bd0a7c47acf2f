"""The calibration report: one self-contained HTML page a reviewer can read at a glance.

It opens with a plain-language verdict (`verdict.judge`), then the headline figures, the plots,
the robust-accuracy estimators, the robustness answers checked (`report_answers`: robust
accuracy over the budget grid, the reliability of p_robust, the margin interval's coverage), the
score choice explained, and every recorded field rendered for people (`report_record`,
`report_fields`): rounded numbers, UTC dates, small tables.

Plots are inline base64 PNGs and the CSS is inline, so the page can be mailed or served from the
artifact store as one file with no external fetch. matplotlib is imported inside the plotting
helpers (`plotting`; the service imports this package without it).
"""

from __future__ import annotations

import dataclasses
import html
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from marginwatch.artifact.schema import CalibrationRecord
from marginwatch.artifact.traffic import Ratio, TrafficCheck
from marginwatch.calibration.answers import Margins
from marginwatch.calibration.metrics import (
    detection_metrics,
    kendall_tau,
    nonrobust_mask,
    roc_curve,
)
from marginwatch.calibration.plotting import CORRECT, WRONG, finish, new_axes
from marginwatch.calibration.report_answers import SubsetPoints, answers_sections
from marginwatch.calibration.report_fields import field_rows, utc_text, value_html
from marginwatch.calibration.report_record import (
    details_section,
    estimators_section,
    score_section,
    subtitle,
    verdict_section,
)
from marginwatch.calibration.threshold import flag_rates

__all__ = ["ReportData", "TrafficReport", "render_report", "render_traffic_section", "with_section"]

Value = str | float | int

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;line-height:1.4}
h1{font-size:1.5em;margin-bottom:.2em}
h2{font-size:1.2em;margin:1.4em 0 .4em}
.sub{color:#555;margin-top:0}
.cards{display:flex;flex-wrap:wrap;gap:.6em;margin:1em 0}
.card{border:1px solid #ccc;border-radius:6px;padding:.5em .9em;background:#f7f7f7}
.card b{display:block;font-size:1.25em}
.card span{font-size:.8em;color:#555}
.verdict{border-left:6px solid;padding:.2em 1em;margin:1em 0;border-radius:4px}
.verdict h2{margin-top:.4em}
.verdict ul{padding-left:1.2em;margin:.3em 0}
.good{border-color:#2e7d32;background:#eef7ee}
.care{border-color:#e0a000;background:#fff8e1}
.bad{border-color:#c62828;background:#fdecea}
.plots{display:flex;flex-wrap:wrap;gap:1em}
.plots>table{align-self:flex-start;margin:0}
figure{margin:0;max-width:540px}
figure img{width:100%;border:1px solid #eee}
figcaption,.note{font-size:.85em;color:#555}
table{border-collapse:collapse;margin:.6em 0}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f4f4f4;font-weight:600}
table.inner{margin:0;font-size:.92em}
table.inner th{background:#fafafa;font-weight:500;white-space:nowrap}
tr.group th{background:#e6ecf3;font-size:1.02em}
code{font-size:.85em;word-break:break-all}
table.fields{width:100%}
table.fields>tbody>tr>th:first-child{width:12em}
table.fields td.note{width:32%}
"""


@dataclass(frozen=True, eq=False)
class ReportData:
    """Everything the report shows; arrays are per attacked-subset point.

    ``margins``: input margin (for ``success == False`` a lower bound, possibly ``inf``; which
    points are non-robust at ``eps`` is decided as everywhere, by ``metrics.nonrobust_mask``);
    ``scores``: detector score (larger = more robust); ``correct``: prediction matches label.
    ``headline``: caller's key facts shown as cards before the computed τ, AUROC, λ and ε
    (model, version, threat model, estimated robust accuracy with CI, ...); ``record``: the
    calibration record, whose estimators, robustness answers, score choice and fields the
    report explains (and whose served estimate's interval the verdict weighs); ``summary``:
    facts the record has no field for, shown after its fields; ``censored_at``: the censored
    points' lower bounds (`MarginResult.censored_at`), which the checks of the margin interval
    and p_robust read (without it, they are shown only when no point is censored).
    """

    margins: np.ndarray
    success: np.ndarray
    scores: np.ndarray
    correct: np.ndarray
    eps: float
    threshold: float
    title: str
    summary: Mapping[str, Value] = field(default_factory=dict)
    headline: Mapping[str, Value] = field(default_factory=dict)
    record: CalibrationRecord | None = None
    censored_at: np.ndarray | None = None


def _subset_points(data: ReportData) -> SubsetPoints:
    """The subset's arrays for the answers' checks; no margins where a censored point's bound
    is unknown."""
    radius = np.asarray(data.margins, dtype=np.float64)
    success = np.asarray(data.success, dtype=bool)
    bound = data.censored_at if data.censored_at is not None else radius
    known = data.censored_at is not None or success.all()
    margins = Margins.of(radius, success, np.asarray(bound, dtype=np.float64)) if known else None
    return SubsetPoints(np.asarray(data.scores), np.asarray(data.correct, dtype=bool), margins)


def _fmt(value: Value) -> str:
    """HTML-escaped display text; floats to 4 significant digits."""
    if isinstance(value, float | np.floating):
        return html.escape(f"{float(value):.4g}")
    return html.escape(str(value))


def _scatter_plot(data: ReportData, names: tuple[str, str] = ("correct", "wrong")) -> str:
    """Margin vs score: consistency is visible as a monotone cloud; λ and ε split the quadrants.
    Points are coloured by `data.correct`, the two groups named by `names`."""
    fig, ax = new_axes()
    d = np.asarray(data.margins, dtype=np.float64)
    ok = np.asarray(data.success, dtype=bool)
    correct = np.asarray(data.correct, dtype=bool)
    finite = d[ok & np.isfinite(d)]
    edge = 1.05 * max(float(finite.max()) if finite.size else 0.0, data.eps * 2.0)
    for mask_c, colour, name in ((correct, CORRECT, names[0]), (~correct, WRONG, names[1])):
        sel = ok & mask_c
        if np.any(sel):
            ax.scatter(d[sel], data.scores[sel], s=8, c=colour, alpha=0.6, label=name)
        cens = ~ok & mask_c
        if np.any(cens):
            xs = np.full(int(cens.sum()), edge)
            label = f"{name}, censored (≥ bound)"
            ax.scatter(xs, data.scores[cens], s=18, c=colour, marker=">", label=label)
    ax.axvline(data.eps, color="k", ls="--", lw=1, label="ε")
    ax.axhline(data.threshold, color="grey", ls=":", lw=1, label="λ")
    return finish(
        fig, ax, xlabel="input margin d(x)", ylabel="score s(x)", title="margin vs score",
        legend={"fontsize": 7},
    )  # fmt: skip


def _roc_plot(data: ReportData, nonrobust: np.ndarray, auroc: float) -> str:
    """ROC of -score for non-robust points, with the operating point of λ."""
    fig, ax = new_axes()
    fpr, tpr, _ = roc_curve(nonrobust, data.scores)
    ax.plot(fpr, tpr, lw=1.5, label=f"AUROC = {auroc:.3f}")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    rates = flag_rates(data.scores, nonrobust, data.threshold)
    if np.isfinite(rates["fpr"]) and np.isfinite(rates["tpr"]):
        ax.plot([rates["fpr"]], [rates["tpr"]], "o", color=WRONG, label="λ operating point")
    return finish(
        fig, ax, xlabel="false positive rate", ylabel="true positive rate (non-robust flagged)",
        title="ROC, detector −score", legend={"fontsize": 8, "loc": "lower right"},
    )  # fmt: skip


def _hist_plot(data: ReportData, nonrobust: np.ndarray) -> str:
    """Score distributions of robust vs non-robust points; their overlap is the error at λ."""
    fig, ax = new_axes()
    bins = np.histogram_bin_edges(np.r_[data.scores, data.threshold], bins=40).tolist()
    for mask, colour, name in ((~nonrobust, CORRECT, "robust"), (nonrobust, WRONG, "non-robust")):
        if np.any(mask):
            ax.hist(data.scores[mask], bins=bins, alpha=0.55, color=colour, label=name)
    ax.axvline(data.threshold, color="k", ls="--", lw=1, label="λ")
    return finish(
        fig, ax, xlabel="score s(x)", ylabel="count", title="score by robustness at ε",
        legend={"fontsize": 8},
    )  # fmt: skip


def _cards(items: Mapping[str, Value]) -> str:
    return "".join(
        f'<div class="card"><span>{html.escape(k)}</span><b>{_fmt(v)}</b></div>'
        for k, v in items.items()
    )


def _table(items: Mapping[str, Value]) -> str:
    rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in items.items()
    )
    return f"<table>{rows}</table>"


CAPTIONS = (
    "Each attacked point: its input margin d(x), the distance to the nearest input with another "
    "label, against its score. A consistent score rises with the margin. Points left of ε are "
    "non-robust; points below λ are flagged brittle.",
    "How well a low score finds the non-robust points, over every threshold; the dot is λ.",
    "Scores of robust and non-robust points: where they overlap around λ, the flag errs.",
)


TRAFFIC_CAPTIONS = (
    "Each checked traffic point: its input margin against the served score, coloured by the "
    "flag the service returned. Points left of ε are non-robust against the served label.",
    CAPTIONS[1],
    CAPTIONS[2],
)


def _figures(images: tuple[str, str, str], captions: tuple[str, ...] = CAPTIONS) -> str:
    return "".join(
        f"<figure>{image}<figcaption>{html.escape(caption)}</figcaption></figure>"
        for image, caption in zip(images, captions, strict=True)
    )


def render_report(data: ReportData) -> str:
    """The whole report as one HTML string: title, verdict, headline cards, three plots, and,
    with a record, the estimators, the robustness answers, the score choice and every recorded
    field."""
    scores = np.asarray(data.scores, dtype=np.float64)
    data = dataclasses.replace(data, scores=scores)
    nonrobust = nonrobust_mask(data.margins, data.success, data.eps)
    det = detection_metrics(nonrobust, scores)
    tau = kendall_tau(np.asarray(data.margins, dtype=np.float64), scores)
    computed: dict[str, Value] = {
        "Kendall τ": tau,
        "AUROC": det.auroc,
        "λ": float(data.threshold),
        "ε": float(data.eps),
        "attacked points": int(scores.size),
    }
    plots = _figures(
        (
            _scatter_plot(data),
            _roc_plot(data, nonrobust, det.auroc),
            _hist_plot(data, nonrobust),
        )
    )
    record = data.record
    sections = _table(data.summary) if data.summary else ""
    if record is not None:
        sections = (
            estimators_section(record)
            + answers_sections(record, _subset_points(data))
            + score_section(record)
            + details_section(record, data.summary)
        )
    title = html.escape(data.title)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{_CSS}</style></head><body><h1>{title}</h1>{subtitle(record)}"
        f"{verdict_section(tau, det.auroc, np.asarray(data.success, dtype=bool), record)}"
        f'<div class="cards">{_cards(data.headline)}{_cards(computed)}</div>'
        f'<div class="plots">{plots}</div>{sections}</body></html>\n'
    )


SECTION_START, SECTION_END = "<!-- traffic-check -->", "<!-- /traffic-check -->"


@dataclass(frozen=True, eq=False)
class TrafficReport:
    """The traffic check and its per-point arrays (margins against the served label, served
    scores and flags), for the report's "Traffic check" section."""

    check: TrafficCheck
    margins: np.ndarray
    success: np.ndarray
    scores: np.ndarray
    brittle: np.ndarray
    threshold: float


def _ratio_text(ratio: Ratio) -> str:
    return (
        f"{ratio.value:.3f} [{ratio.ci_low:.3f}, {ratio.ci_high:.3f}] ({ratio.count}/{ratio.total})"
    )


def _maybe(value: float | None) -> Value:
    return "n/a" if value is None else value


def render_traffic_section(data: TrafficReport) -> str:
    """The section: headline cards, the plots of the calibration on the traffic sample (points
    coloured by the served flag), and the check's figures, between markers `with_section`
    finds again."""
    check = data.check
    cards: dict[str, Value] = {
        "non-robust (measured)": _ratio_text(check.nonrobust),
        "flagged (served)": _ratio_text(check.flagged),
        "intervals overlap": "yes" if check.ratios_agree else "NO",
        "recall": _maybe(check.recall),
        "precision": _maybe(check.precision),
        "FPR": _maybe(check.false_positive_rate),
        "Kendall τ": _maybe(check.kendall_tau),
        "AUROC": _maybe(check.auroc),
        "live gauge (mean g)": check.live_gauge,
        "robust (1 − non-robust)": 1.0 - check.nonrobust.value,
    }
    plot_data = ReportData(
        margins=data.margins,
        success=data.success,
        scores=np.asarray(data.scores, dtype=np.float64),
        correct=~np.asarray(data.brittle, dtype=bool),
        eps=check.threat_model.eps,
        threshold=data.threshold,
        title="",
    )
    nonrobust = nonrobust_mask(plot_data.margins, plot_data.success, plot_data.eps)
    auroc = check.auroc if check.auroc is not None else float("nan")
    plots = _figures(
        (
            _scatter_plot(plot_data, ("not flagged", "flagged")),
            _roc_plot(plot_data, nonrobust, auroc),
            _hist_plot(plot_data, nonrobust),
        ),
        TRAFFIC_CAPTIONS,
    )
    return (
        f'{SECTION_START}<section id="traffic-check"><h2>Traffic check</h2>'
        f"<p>Served version {html.escape(check.version)}, checked on "
        f"{check.nonrobust.total} points drawn at random (seed {value_html('seed', check.seed)}) "
        f"from the "
        f"{check.available_points} it served since {utc_text(check.traffic_since)}, attacked "
        "against the served labels: non-robust is measured without labels, flagged is what "
        "the service returned. The live gauge is the mean of the calibration curve g over "
        "these points; the measured robust fraction (1 − non-robust) bounds the correct and "
        "robust fraction from above.</p>"
        f'<div class="cards">{_cards(cards)}</div><div class="plots">{plots}</div>'
        f'<h3>Everything recorded</h3><table class="fields">{field_rows(check, notes=True)}'
        f"</table></section>{SECTION_END}"
    )


def with_section(page: str, section: str) -> str:
    """`page` with `section` in place of its previous traffic section, or before `</body>`."""
    start, end = page.find(SECTION_START), page.find(SECTION_END)
    if start >= 0 and end > start:
        return page[:start] + section + page[end + len(SECTION_END) :]
    body = page.rfind("</body>")
    if body < 0:
        raise ValueError("the report has no </body> to put the traffic section before")
    return page[:body] + section + page[body:]
