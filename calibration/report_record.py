"""The report's sections on the calibration record, in plain words: the verdict, the two
robust-accuracy estimators, the score choice, and every recorded field (`report_fields`)."""

from __future__ import annotations

import html
from collections.abc import Mapping

import numpy as np

from marginwatch.artifact.schema import CalibrationRecord, PseudoMarginFacts, ScoreChoice
from marginwatch.calibration.report_fields import (
    duration_text,
    field_rows,
    iso_utc_text,
    label,
    number_text,
    value_html,
)
from marginwatch.calibration.verdict import Figures, judge, rule_text

__all__ = [
    "details_section",
    "estimators_section",
    "score_section",
    "subtitle",
    "verdict_section",
]

GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "Model",
        ("model_name", "version", "model_sha256", "model_source", "input_shape", "input_range"),
    ),
    ("Labels", ("class_names",)),
    ("Flag", ("threat_model", "score_kind", "threshold", "threshold_rule", "guard_band")),
    ("Served gauge", ("live_curve",)),
    ("Data and attacks", ("subset", "big_set", "attacks", "censored")),
    (
        "Detection on the subset",
        ("kendall_tau", "auroc", "aupr", "fpr_at_95_tpr", "precision_not_brittle"),
    ),
    (
        "Accuracy",
        (
            "subset_clean_accuracy",
            "subset_robust_accuracy",
            "big_set_clean_accuracy",
            "robust_accuracy",
            "robust_accuracy_estimates",
        ),
    ),
    ("Robustness answers", ("budgets", "margin_quantiles", "predicted_class_counts")),
    ("Pseudo-margin", ("pseudo_margin",)),
    ("Run", ("created_at", "duration_s", "software", "schema_version")),
)
"""The record's fields in the order a reader looks for them; fields added later and not named
here are shown under "Other"."""

ESTIMATORS: Mapping[str, str] = {
    "count": (
        "The paper's estimator: fit λ on the attacked subset, then count the big-set points that "
        "are classified correctly and not flagged (score ≥ λ). It inherits λ's sampling error "
        "and every misflag of the detector."
    ),
    "regression": (
        "Fit P(robust | score, correct) on the subset's correctly classified points (isotonic "
        "regression), then average it over the big set's correct points. It uses the score's "
        "value, not only its side of λ, and usually has the narrower interval."
    ),
}

SCORES: Mapping[str, str] = {
    "logit-margin": (
        "the top-1 minus the top-2 logit: free to compute, and a good score when the model's "
        "logits already rank inputs by their distance to the boundary"
    ),
    "guarded-pseudo-margin": (
        "a small MLP trained to predict the input margin from the model's features, capped by "
        "κ times the logit margin so that inputs just past a boundary are still flagged"
    ),
}

_LEVEL_CLASS = {"trustworthy": "good", "usable with care": "care", "not trustworthy": "bad"}


def subtitle(record: CalibrationRecord | None) -> str:
    """When, how long, and what the flag is, under the title."""
    if record is None:
        return ""
    return (
        f'<p class="sub">Calibrated {html.escape(iso_utc_text(record.created_at))} in '
        f"{html.escape(duration_text(record.duration_s))}. A prediction is flagged brittle when "
        f"its score is below λ = {number_text(record.threshold)}.</p>"
    )


def _interval_width(record: CalibrationRecord | None) -> float | None:
    """The served estimate's interval width; None without a record or an interval."""
    estimate = None if record is None else record.robust_accuracy
    if estimate is None or estimate.ci_low is None or estimate.ci_high is None:
        return None
    return estimate.ci_high - estimate.ci_low


def verdict_section(
    tau: float, auroc: float, success: np.ndarray, record: CalibrationRecord | None
) -> str:
    """The verdict first (`verdict.judge` on the τ and AUROC the page shows, the censored share
    of `success`, and the record's interval): its level, one sentence, one line per figure with
    its number, and the rule."""
    verdict = judge(
        Figures(
            kendall_tau=tau,
            auroc=auroc,
            interval_width=_interval_width(record),
            censored=int((~success).sum()),
            points=int(success.size),
        )
    )
    scope = ""
    if record is not None:
        threat = record.threat_model
        scope = (
            f" for {html.escape(record.model_name)} at {threat.norm} ε = {threat.eps:g}, "
            f"judged on the {success.size} attacked subset points"
        )
    reasons = "".join(f"<li>{html.escape(reason)}</li>" for reason in verdict.reasons)
    return (
        f'<section class="verdict {_LEVEL_CLASS[verdict.level]}"><h2>Verdict: '
        f"{html.escape(verdict.level)}</h2><p>{html.escape(verdict.summary)}</p>"
        f"<p>Figures{scope}:</p><ul>{reasons}</ul>"
        f'<p class="note">How the verdict is decided: {html.escape(rule_text())}</p></section>'
    )


def _interval(low: float | None, high: float | None) -> str:
    if low is None or high is None:
        return "none (no bootstrap)"
    return f"{number_text(low)} to {number_text(high)}"


def estimators_section(record: CalibrationRecord) -> str:
    """Robust accuracy explained, and each estimator's figure with its interval."""
    served = record.robust_accuracy.method
    rows = "".join(
        f"<tr><th>{html.escape(e.method)}{' (served)' if e.method == served else ''}</th>"
        f"<td>{number_text(e.estimate)}</td><td>{_interval(e.ci_low, e.ci_high)}</td>"
        f"<td>{value_html('bootstrap', e.bootstrap)}</td>"
        f'<td class="note">{html.escape(ESTIMATORS.get(e.method, ""))}</td></tr>'
        for e in record.robust_accuracy_estimates
    )
    return (
        "<section><h2>Robust accuracy</h2><p>Robust accuracy is the share of the big set "
        f"({record.big_set.size:,} points of {html.escape(record.big_set.dataset)}, "
        f"{record.big_set.split}) that the model classifies correctly <em>and</em> that no "
        f"perturbation within ε = {record.threat_model.eps:g} ({record.threat_model.norm}) can "
        f"flip. Only the subset ({record.subset.size} points) is attacked; there it measures "
        f"{number_text(record.subset_robust_accuracy)}. Two estimators carry it over to the big "
        "set; the one marked served is what the service reports (and the command line's summary "
        "marks with *).</p><table><tr><th>estimator</th><th>estimate</th><th>95 % interval</th>"
        f"<th>bootstrap resamples</th><th>how it works</th></tr>{rows}</table></section>"
    )


def _choice_html(choice: ScoreChoice) -> str:
    names = {c.name for c in choice.candidates}
    explained = "".join(
        f"<li><b>{html.escape(name)}</b>: {html.escape(SCORES[name])}</li>"
        for name in sorted(names & SCORES.keys())
    )
    rule = (
        "The learned score is served only when, on the subset it never saw, it gains at least "
        f"{number_text(choice.min_auroc_gain)} AUROC or {number_text(choice.min_tau_gain)} "
        f"Kendall τ, or narrows the estimate's interval by {100 * choice.min_spread_gain:g} %, "
        "without losing boundary recall: otherwise its cost on every request buys nothing."
    )
    return (
        f"<ul>{explained}</ul><p><b>Served: {html.escape(choice.chosen)}.</b> Recorded reason: "
        f"“{html.escape(choice.reason)}”.</p>{value_html('candidates', choice.candidates)}"
        f'<p class="note">{html.escape(rule)}</p>'
    )


def _facts_html(facts: PseudoMarginFacts) -> str:
    """Older records: the held-out comparison without a recorded choice."""
    verdict = "served" if facts.chosen else "not served"
    return (
        f"<p>A pseudo-margin was fitted and is {verdict}: Kendall τ "
        f"{number_text(facts.logit_margin_tau)} (logit margin) against "
        f"{value_html('tau', facts.pseudo_margin_tau)} (pseudo-margin), AUROC "
        f"{number_text(facts.logit_margin_auroc)} against "
        f"{value_html('auroc', facts.pseudo_margin_auroc)}.</p>"
    )


def score_section(record: CalibrationRecord) -> str:
    """Which score is served, and the recorded reason."""
    facts = record.pseudo_margin
    if facts is None:
        body = (
            f"<p>Served: <b>logit margin</b>, {html.escape(SCORES['logit-margin'])}. No "
            "pseudo-margin was fitted (<code>--pseudo-margin never</code>).</p>"
        )
    elif facts.choice is not None:
        body = _choice_html(facts.choice)
    else:
        body = _facts_html(facts)
    return f"<section><h2>Score choice</h2>{body}</section>"


def details_section(record: CalibrationRecord, extra: Mapping[str, str | float | int]) -> str:
    """Every field of the record, grouped, with what it means; `extra`: facts the record has no
    field for (say, where a `--refit` fitted λ)."""
    fields = type(record).model_fields
    named = {key for _, keys in GROUPS for key in keys}
    rest = tuple(key for key in fields if key not in named)
    groups = GROUPS + ((("Other", rest),) if rest else ())
    rows = "".join(
        f'<tr class="group"><th colspan="3">{html.escape(title)}</th></tr>'
        + field_rows(record, [key for key in keys if key in fields], notes=True)
        for title, keys in groups
    )
    if extra:
        rows += '<tr class="group"><th colspan="3">Notes</th></tr>' + "".join(
            f"<tr><th>{html.escape(label(key))}</th><td>{value_html(key, value)}</td><td></td></tr>"
            for key, value in extra.items()
        )
    return (
        "<section><h2>Everything recorded</h2><p>All of <code>calibration.json</code>, the file "
        f'the service loads.</p><table class="fields">{rows}</table></section>'
    )
