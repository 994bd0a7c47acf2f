"""Recorded fields rendered for people: the report's tables of `calibration.json` and
`traffic-check.json`, never their Python or JSON text.

Numbers to 4 significant digits (integers in full, with thousands separators), times as UTC
dates, durations in minutes and seconds, a nested record as a small table of its own, a list of
records as a table with one row each, every field under a readable label with, where the schema
or `NOTES` has one, a line on what it means. Everything returned is escaped HTML.
"""

from __future__ import annotations

import datetime as dt
import html
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pydantic import BaseModel

from marginwatch.artifact.schema import (
    BudgetAnswers,
    Curve,
    MarginQuantiles,
    RobustAccuracyEstimate,
    ScoreChoice,
    ThresholdRuleSpec,
)

__all__ = [
    "LABELS",
    "NOTES",
    "duration_text",
    "field_rows",
    "iso_utc_text",
    "label",
    "number_text",
    "utc_text",
    "value_html",
]

LABELS: dict[str, str] = {
    "schema_version": "schema version",
    "model_name": "model",
    "model_sha256": "ONNX file SHA-256",
    "input_shape": "input shape",
    "input_range": "input range",
    "class_names": "class names, in label order",
    "threat_model": "threat model",
    "eps": "ε",
    "score_kind": "served score",
    "threshold": "λ",
    "threshold_rule": "rule that fitted λ",
    "guard_band": "guard band",
    "subset": "attacked subset",
    "big_set": "big set",
    "censored": "censored points",
    "kendall_tau": "Kendall τ",
    "auroc": "AUROC",
    "aupr": "AUPR",
    "fpr_at_95_tpr": "FPR at 95 % TPR",
    "subset_clean_accuracy": "subset clean accuracy",
    "subset_robust_accuracy": "subset robust accuracy (measured)",
    "big_set_clean_accuracy": "big set clean accuracy",
    "robust_accuracy": "robust accuracy (served estimator)",
    "robust_accuracy_estimates": "robust accuracy, both estimators",
    "ci_low": "95 % interval from",
    "ci_high": "to",
    "bootstrap": "bootstrap resamples",
    "precision_not_brittle": "precision of “not brittle”",
    "live_curve": "live curve g",
    "pseudo_margin": "pseudo-margin",
    "created_at": "created",
    "duration_s": "duration",
    "score_input": "MLP input",
    "hidden": "hidden width",
    "layers": "hidden layers",
    "train_points": "training points",
    "held_out_points": "held-out points",
    "path_points": "attack-path points",
    "logit_margin_tau": "logit margin τ",
    "logit_margin_auroc": "logit margin AUROC",
    "pseudo_margin_tau": "pseudo-margin τ (unguarded)",
    "pseudo_margin_auroc": "pseudo-margin AUROC (unguarded)",
    "chosen": "chosen",
    "guard_scale": "guard scale κ",
    "guard_share": "guard share",
    "choice": "score choice",
    "min_auroc_gain": "least AUROC gain",
    "min_tau_gain": "least τ gain",
    "min_spread_gain": "least interval narrowing",
    "estimate": "estimate",
    "estimate_spread": "interval width",
    "boundary_recall": "boundary recall",
    "boundary_points": "first-flip points",
    "multiply_adds": "multiply-adds per request",
    "succeeded": "points flipped",
    "traffic_since": "traffic since",
    "traffic_until": "traffic until",
    "available_points": "points served since then",
    "nonrobust": "non-robust (measured)",
    "flagged": "flagged (served)",
    "false_positive_rate": "false positive rate",
    "live_gauge": "live gauge",
    "ratios_agree": "intervals overlap",
    "budgets": "budget grid",
    "margin_quantiles": "margin quantiles given the score",
    "predicted_class_counts": "big-set predictions per class",
}
"""Field name → label; a name missing here reads with its underscores as spaces."""

NOTES: dict[str, str] = {
    "input_range": "what the model's inputs span; attacks stay inside it",
    "kendall_tau": "how alike the score and the input margin rank the points (1: identically)",
    "auroc": "chance that a non-robust point scores below a robust one",
    "aupr": "area under precision-recall for finding the non-robust points",
    "fpr_at_95_tpr": "share of robust points flagged when 95 % of the non-robust ones are",
    "subset_robust_accuracy": "correct and not flipped within ε, measured by the attacks",
    "big_set_clean_accuracy": "the share of the big set the model classifies correctly",
    "robust_accuracy": "the estimate the service reports (chosen by --estimator)",
    "robust_accuracy_estimates": "count and regression (see “Robust accuracy” above)",
    "subset": "the points attacked to measure input margins",
    "big_set": "the labelled set whose robust accuracy is estimated",
    "score_kind": "logit margin, or the pseudo-margin guarded by it",
    "software": "versions the calibration ran with",
    "pseudo_margin": "the learned score, measured against the logit margin on the subset",
    "created_at": "when the run that wrote it finished",
    "traffic_since": "the oldest sample considered",
    "traffic_until": "the newest sample considered",
    "path_points": "points on attack paths the MLP also learned from",
    "seed": "draws the points; the same seed draws the same ones",
    "budgets": "see “Robust accuracy vs budget” and “Reliability of p_robust” above",
    "margin_quantiles": "see “Margin interval” above",
    "predicted_class_counts": "in label order: which classes get their own metric label",
}
"""Field name → what it means, for fields whose schema has no description."""


def label(key: str) -> str:
    return LABELS.get(key, key.replace("_", " "))


def number_text(value: float) -> str:
    """4 significant digits; whole numbers from 10,000 up in full, with separators."""
    if math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    if abs(value) >= 1e4:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def utc_text(seconds: float) -> str:
    """Unix seconds as ``2026-12-01 19:35:07 UTC``."""
    return dt.datetime.fromtimestamp(seconds, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def iso_utc_text(text: str) -> str:
    """An ISO time as `utc_text` spells it; text that is no ISO time stays as it is."""
    try:
        moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return text
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return utc_text(moment.timestamp())


def duration_text(seconds: float) -> str:
    """``24 min 33 s``, ``1 h 02 min``, ``3.2 s``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {rest:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def _curve_text(curve: Curve) -> str:
    first, last = curve.knots_x[0], curve.knots_x[-1]
    return (
        f"{len(curve.knots_x)} knots; {number_text(curve.knots_y[0])} for scores up to "
        f"{number_text(first)}, rising to {number_text(curve.knots_y[-1])} from "
        f"{number_text(last)} on"
    )


def _estimate_text(estimate: RobustAccuracyEstimate) -> str:
    """``0.7046 [0.6817, 0.7243]``; the point alone without an interval."""
    text = number_text(estimate.estimate)
    if estimate.ci_low is None or estimate.ci_high is None:
        return text
    return f"{text} [{number_text(estimate.ci_low)}, {number_text(estimate.ci_high)}]"


def _budgets_html(budgets: list[BudgetAnswers] | None) -> str:
    """The grid as one table: a row per budget, the curves in words."""
    if budgets is None:
        return "not recorded (an older record: the flag at ε only)"
    head = ("ε'", "λ(ε')", "robust accuracy", "subset non-robust", "p_robust", "live curve g",
            "p_robust ECE")  # fmt: skip
    rows = "".join(
        f"<tr><td>{b.eps:g}</td><td>{number_text(b.threshold)}</td>"
        f"<td>{html.escape(_estimate_text(b.robust_accuracy))}</td>"
        f"<td>{number_text(b.subset_nonrobust)}</td>"
        f"<td>{html.escape(_curve_text(b.p_robust))}</td>"
        f"<td>{html.escape(_curve_text(b.live_curve))}</td>"
        f"<td>{_scalar(b.p_robust_ece)}</td></tr>"
        for b in budgets
    )
    heads = "".join(f"<th>{html.escape(name)}</th>" for name in head)
    return f'<table class="inner"><tr>{heads}</tr>{rows}</table>'


def _quantiles_text(quantiles: MarginQuantiles | None) -> str:
    if quantiles is None:
        return "not recorded (an older record)"
    middle = quantiles.knots_y[len(quantiles.levels) // 2]
    coverage = "not measured" if quantiles.coverage is None else number_text(quantiles.coverage)
    return (
        f"levels {', '.join(f'{level:g}' for level in quantiles.levels)} on "
        f"{len(quantiles.knots_x)} score knots from {number_text(quantiles.knots_x[0])} to "
        f"{number_text(quantiles.knots_x[-1])}; the middle level rises from "
        f"{number_text(middle[0])} to {number_text(middle[-1])}; interval coverage "
        f"{coverage} (cross-fitted) for a nominal {quantiles.interval:g}"
    )


_FORMATS: dict[str, Callable[[Any], str]] = {
    "created_at": lambda text: html.escape(iso_utc_text(str(text))),
    "input_shape": lambda shape: html.escape(" × ".join(str(item) for item in shape)),
    "input_range": lambda pair: html.escape(f"[{', '.join(number_text(v) for v in pair)}]"),
    "model_sha256": lambda digest: f"<code>{html.escape(str(digest))}</code>",
    "budgets": _budgets_html,
    "margin_quantiles": lambda quantiles: html.escape(_quantiles_text(quantiles)),
}


_KINDS: tuple[tuple[type, Callable[[Any], str]], ...] = (
    (ThresholdRuleSpec, lambda spec: html.escape(str(spec))),
    (Curve, lambda curve: html.escape(_curve_text(curve))),
    # the score choice has a section of its own, which tells it in full
    (ScoreChoice, lambda choice: f"{html.escape(choice.chosen)}: see “Score choice” above"),
)


def _by_key(key: str, value: Any) -> str | None:
    """Fields whose form says more than their type; None for the rest."""
    if key in _FORMATS:
        return _FORMATS[key](value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        if key.startswith("traffic_"):
            return html.escape(utc_text(float(value)))
        if key.endswith("_s"):
            return html.escape(duration_text(float(value)))
    return next((show(value) for kind, show in _KINDS if isinstance(value, kind)), None)


def _scalar(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 1e4 else str(value)
    if isinstance(value, float):
        return number_text(value)
    return html.escape(str(value))


def value_html(key: str, value: Any) -> str:
    """`value` of field `key` as escaped HTML: nested records as small tables."""
    special = _by_key(key, value)
    if special is not None:
        return special
    if isinstance(value, BaseModel):
        return f'<table class="inner">{field_rows(value)}</table>'
    if isinstance(value, Mapping):
        rows = "".join(
            f"<tr><th>{html.escape(str(k))}</th><td>{value_html(str(k), v)}</td></tr>"
            for k, v in value.items()
        )
        return f'<table class="inner">{rows}</table>'
    if isinstance(value, list | tuple):
        if value and all(isinstance(item, BaseModel) for item in value):
            return _records_table(value)
        return ", ".join(value_html(key, item) for item in value) or "—"
    return _scalar(value)


def _records_table(items: Iterable[BaseModel]) -> str:
    """Records of one type as one table: a column per field, a row per record."""
    items = list(items)
    keys = list(type(items[0]).model_fields)
    head = "".join(f"<th>{html.escape(label(k))}</th>" for k in keys)
    body = "".join(
        "<tr>" + "".join(f"<td>{value_html(k, getattr(item, k))}</td>" for k in keys) + "</tr>"
        for item in items
    )
    return f'<table class="inner"><tr>{head}</tr>{body}</table>'


def _note(model: BaseModel, key: str) -> str:
    field = type(model).model_fields.get(key)
    described = field.description if field is not None else None
    return html.escape(NOTES.get(key) or described or "")


def field_rows(model: BaseModel, keys: Iterable[str] | None = None, *, notes: bool = False) -> str:
    """One ``<tr>`` per field of `model` (its `keys`, in that order; default: all): label,
    value and, with `notes`, what it means."""
    rows = []
    for key in type(model).model_fields if keys is None else keys:
        note = f'<td class="note">{_note(model, key)}</td>' if notes else ""
        cell = value_html(key, getattr(model, key))
        rows.append(f"<tr><th>{html.escape(label(key))}</th><td>{cell}</td>{note}</tr>")
    return "".join(rows)
