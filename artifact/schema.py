"""The calibration artifact's schema: one pydantic model of plain data, written by the
calibration job and validated by the service. No torch, nothing pickled.

Schema 2 spells the threshold rule as typed fields (`ThresholdRuleSpec`); schema 1 spelled it
as one string. Version-1 records are still read: `CalibrationRecord` upgrades them on validation.
Fields added within version 2 are optional with a default that means "not recorded", so records
written before them still validate.
"""

from __future__ import annotations

from functools import cached_property
from typing import Annotated, Any, Final, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

SCHEMA_VERSION: Literal[2] = 2
ONNX_FILE = "model.onnx"
RECORD_FILE = "calibration.json"
REPORT_FILE = "report.html"

Norm = Literal["linf", "l2"]
ScoreKind = Literal["logit-margin", "pseudo-margin"]
ThresholdRuleName = Literal["match-fraction", "target-tpr"]
EstimateMethod = Literal["count", "regression"]
Probability = Annotated[float, Field(ge=0, le=1)]
# The target-tpr rule's fraction of non-robust points to flag, in (0, 1], for the artifact and
# the job's --target-tpr alike: 0 would flag nothing, 1 every non-robust point
TargetTpr = Annotated[float, Field(gt=0, le=1)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ThreatModel(_Frozen):
    norm: Norm
    eps: float = Field(gt=0, description="perturbation budget in the input range [0, 1]")


class AttackBudget(_Frozen):
    name: str
    steps: int = Field(gt=0)
    succeeded: int = Field(ge=0, description="subset points where this attack found a flip")


class ThresholdRuleSpec(_Frozen):
    """How λ was chosen on the attacked subset.

    ``match-fraction`` flags as many subset points as are non-robust; ``target-tpr`` takes the
    least-flagging λ that catches ``target_tpr`` of the non-robust points. ``target_tpr`` is
    present exactly for ``target-tpr``, so a result-changing parameter is never implied.
    """

    name: ThresholdRuleName
    target_tpr: TargetTpr | None = Field(
        default=None, description="fraction of non-robust points to flag (target-tpr)"
    )

    @model_validator(mode="after")
    def _target_tpr_iff_target_rule(self) -> ThresholdRuleSpec:
        if self.name == "target-tpr" and self.target_tpr is None:
            raise ValueError("threshold rule 'target-tpr' needs target_tpr in (0, 1]")
        if self.name != "target-tpr" and self.target_tpr is not None:
            raise ValueError(f"threshold rule {self.name!r} takes no target_tpr")
        return self

    def __str__(self) -> str:
        """``match-fraction`` or ``target-tpr@0.95``: the display form, and schema 1's encoding."""
        return self.name if self.target_tpr is None else f"{self.name}@{self.target_tpr:g}"


class Curve(_Frozen):
    """A non-decreasing piecewise-linear function of the score into [0, 1], flat beyond its
    knots: ``np.interp(s, knots_x, knots_y)``. The job fits it (isotonic regression, see
    `calibration.estimators`); the service evaluates it on every batch."""

    knots_x: list[Annotated[float, Field(allow_inf_nan=False)]] = Field(min_length=1)
    knots_y: list[Probability] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> Curve:
        if len(self.knots_x) != len(self.knots_y):
            raise ValueError("knots_x and knots_y differ in length")
        if any(b < a for a, b in zip(self.knots_x, self.knots_x[1:], strict=False)):
            raise ValueError("knots_x must be sorted")
        if any(b < a for a, b in zip(self.knots_y, self.knots_y[1:], strict=False)):
            raise ValueError("knots_y must be non-decreasing")
        return self

    @cached_property
    def _knots(self) -> tuple[np.ndarray, np.ndarray]:
        # converted once: the service evaluates the curve on every batch
        return np.asarray(self.knots_x, dtype=np.float64), np.asarray(self.knots_y, np.float64)

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        knots_x, knots_y = self._knots
        return np.interp(scores, knots_x, knots_y)


class RobustAccuracyEstimate(_Frozen):
    """A point estimate with its percentile-bootstrap interval (none without bootstrap draws)."""

    method: EstimateMethod
    estimate: Probability
    ci_low: Probability | None
    ci_high: Probability | None
    bootstrap: int | None = Field(
        default=None, ge=0, description="bootstrap draws behind the interval (schema 1: absent)"
    )

    @model_validator(mode="after")
    def _check_interval(self) -> RobustAccuracyEstimate:
        if (self.ci_low is None) != (self.ci_high is None):
            raise ValueError("ci_low and ci_high are both given or both absent")
        if self.ci_low is not None and self.ci_high is not None and self.ci_high < self.ci_low:
            raise ValueError(f"ci_low {self.ci_low} exceeds ci_high {self.ci_high}")
        if self.bootstrap is not None and (self.bootstrap == 0) != (self.ci_low is None):
            raise ValueError("an interval comes from bootstrap draws: bootstrap = 0 has none")
        return self


class DataSource(_Frozen):
    dataset: str
    split: Literal["train", "test"]
    size: int = Field(gt=0)
    seed: int | None = None
    data_dir: str | None = Field(
        default=None, description="`--data-dir` as given (absent: not given, or older records)"
    )


class ModelSource(_Frozen):
    """How the job loaded the model and fed it: `--model` and `--weights` as given, and the
    input the model itself expects (`--input-range`, then `(x − mean) / std`), which the served
    graph computes inside; the graph takes [0, 1] (the record's `input_range`). A `--traffic`
    check and `--refit` reuse them. Absent in records written before issue 17."""

    model: str = Field(min_length=1)
    weights: str | None = None
    input_range: tuple[float, float] = (0.0, 1.0)
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)


class ScoreFigures(_Frozen):
    """What one candidate score measured on the attacked subset (held out from its training)."""

    name: str = Field(description="logit-margin, or guarded-pseudo-margin")
    kendall_tau: float
    auroc: float
    threshold: float = Field(description="λ the job's rule fits on this score")
    estimate: Probability = Field(
        description="regression estimate of the big set's robust accuracy"
    )
    estimate_spread: float = Field(description="width of that estimate's bootstrap interval")
    boundary_recall: Probability | None = Field(
        default=None,
        description="fraction of first-flip points flagged at λ (absent: not measured)",
    )
    boundary_points: int | None = Field(default=None, ge=0)
    multiply_adds: int = Field(ge=0, description="the score's cost per request beyond the logits")


class ScoreChoice(_Frozen):
    """Why the served score was chosen: each candidate's figures, the rule's margins, a reason."""

    candidates: list[ScoreFigures] = Field(min_length=1)
    chosen: str
    reason: str
    min_auroc_gain: float
    min_tau_gain: float
    min_spread_gain: float = Field(description="relative reduction of the estimate's spread")


class PseudoMarginFacts(_Frozen):
    """Held-out comparison of the learned pseudo-margin against the logit margin. The
    `pseudo_margin_*` figures are the MLP's own; `guard_scale` and `choice` (schema 2 records
    from issue 10 on) say whether it is served guarded by the logit margin, and why."""

    score_input: Literal["features", "logits"]
    hidden: int | None = Field(default=None, description="MLP hidden width (absent: 256)")
    layers: int | None = Field(default=None, description="MLP hidden layers (absent: 2)")
    train_points: int
    held_out_points: int
    logit_margin_tau: float
    logit_margin_auroc: float
    # None since issue 17: no MLP was fitted (too few training points; `choice.reason` says so)
    pseudo_margin_tau: float | None = None
    pseudo_margin_auroc: float | None = None
    chosen: bool
    guard_scale: float | None = Field(
        default=None,
        gt=0,
        description="κ of the served min(pseudo-margin, κ · logit margin); absent: unguarded",
    )
    choice: ScoreChoice | None = Field(default=None, description="absent in older records")
    path_points: int | None = Field(
        default=None,
        ge=0,
        description=(
            "attack-path points the MLP was trained on besides the train_points "
            "(x + t(x* − x), target (1 − t)·‖x* − x‖); absent in older records: none"
        ),
    )
    guard_share: float | None = Field(
        default=None,
        gt=0,
        description="the logit margin's share of its own λ that κ was set for; absent: 1",
    )


class BudgetAnswers(_Frozen):
    """What the calibration knows at one budget ε' of its grid, from the margins it measured
    (no attack of its own): λ(ε') by the job's threshold rule, the robust-accuracy estimate, the
    curves P(robust | s) (served as `p_robust`) and g(s) = P(correct and robust | s) (the live
    gauge's at ε'), and the held-out check of `p_robust` on the subset (cross-fitted)."""

    eps: float = Field(gt=0, description="the budget ε', in the threat model's norm")
    threshold: float = Field(description="λ(ε'): brittle at ε' when score < λ(ε')")
    robust_accuracy: RobustAccuracyEstimate
    subset_nonrobust: Probability = Field(description="the subset's share with margin ≤ ε'")
    p_robust: Curve = Field(description="P(margin > ε' | score = s), isotonic, label-free")
    live_curve: Curve = Field(description="g(s) = P(correct and margin > ε' | score = s)")
    p_robust_ece: Probability | None = Field(
        default=None,
        description="expected calibration error of p_robust (10 bins), cross-fitted on the subset",
    )


class MarginQuantiles(_Frozen):
    """Conditional quantiles of the input margin r (label-free, in the threat model's norm)
    given the score: one non-decreasing piecewise-linear curve per level, on shared knots, flat
    beyond them (`np.interp`). Censored margins enter as lower bounds (Kaplan–Meier per score
    bin), so a quantile that the attacks never reached is the largest bound seen: a floor."""

    levels: list[Annotated[float, Field(gt=0, lt=1)]] = Field(min_length=1)
    knots_x: list[Annotated[float, Field(allow_inf_nan=False)]] = Field(min_length=1)
    knots_y: list[list[Annotated[float, Field(ge=0, allow_inf_nan=False)]]] = Field(
        description="knots_y[i][j]: the levels[i] quantile at knots_x[j]"
    )
    interval: Probability = Field(description="the coverage [low, high] aims at: last − first")
    coverage: Probability | None = Field(
        default=None, description="the interval's coverage, cross-fitted on the subset"
    )

    @model_validator(mode="after")
    def _check(self) -> MarginQuantiles:
        if any(b <= a for a, b in zip(self.levels, self.levels[1:], strict=False)):
            raise ValueError("levels must increase")
        if len(self.knots_y) != len(self.levels):
            raise ValueError("knots_y needs one row per level")
        if any(len(row) != len(self.knots_x) for row in self.knots_y):
            raise ValueError("each knots_y row needs one value per knot")
        if any(b < a for a, b in zip(self.knots_x, self.knots_x[1:], strict=False)):
            raise ValueError("knots_x must be sorted")
        rows = np.asarray(self.knots_y, dtype=np.float64)
        if np.any(np.diff(rows, axis=1) < 0) or np.any(np.diff(rows, axis=0) < 0):
            raise ValueError("quantiles must be non-decreasing in the score and in the level")
        return self

    @cached_property
    def _knots(self) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.knots_x, np.float64), np.asarray(self.knots_y, np.float64)

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        """The quantiles at `scores`: shape (levels, n)."""
        knots_x, knots_y = self._knots
        return np.stack([np.interp(scores, knots_x, row) for row in knots_y])


# A model's or a version's name: one path component in the store, never `..` or hidden.
NAME_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class CalibrationRecord(_Frozen):
    """`calibration.json`: what the service needs to flag, and what a person needs to trust it."""

    schema_version: Literal[2] = SCHEMA_VERSION
    model_name: str = Field(pattern=NAME_PATTERN)
    version: str = Field(pattern=NAME_PATTERN)
    model_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    input_shape: list[int] = Field(min_length=1)
    input_range: tuple[float, float] = (0.0, 1.0)
    class_names: list[str] = Field(min_length=2)
    threat_model: ThreatModel
    score_kind: ScoreKind
    threshold: float = Field(description="λ: a prediction is brittle when score < λ")
    threshold_rule: ThresholdRuleSpec
    guard_band: float = Field(ge=0, description="largest |score change| between batch 1 and 64")
    subset: DataSource
    big_set: DataSource
    attacks: list[AttackBudget] = Field(min_length=1)
    censored: int = Field(ge=0, description="subset points where every attack failed")
    kendall_tau: float
    auroc: float
    aupr: float
    fpr_at_95_tpr: float
    subset_clean_accuracy: float = Field(ge=0, le=1)
    subset_robust_accuracy: float = Field(ge=0, le=1)
    big_set_clean_accuracy: float = Field(ge=0, le=1)
    robust_accuracy: RobustAccuracyEstimate
    robust_accuracy_estimates: list[RobustAccuracyEstimate]
    precision_not_brittle: float = Field(
        ge=0, le=1, description="P(correct and robust | not brittle) on the attacked subset"
    )
    live_curve: Curve = Field(description="g(s) = P(correct and robust | score = s)")
    pseudo_margin: PseudoMarginFacts | None = None
    budgets: list[BudgetAnswers] | None = Field(
        default=None,
        description="the budget grid, increasing ε', the served ε among them (absent: older "
        "records, which serve ε alone)",
    )
    margin_quantiles: MarginQuantiles | None = Field(
        default=None, description="the margin's quantiles given the score (absent: older records)"
    )
    predicted_class_counts: list[Annotated[int, Field(ge=0)]] | None = Field(
        default=None,
        description="big-set predictions per class: which classes get their own metric label",
    )
    model_source: ModelSource | None = Field(
        default=None, description="the model and its input normalisation (absent: older records)"
    )
    created_at: str
    duration_s: float = Field(ge=0)
    software: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _answers_fit_the_record(self) -> CalibrationRecord:
        counts = self.predicted_class_counts
        if counts is not None and len(counts) != len(self.class_names):
            raise ValueError("predicted_class_counts needs one count per class")
        if self.budgets is None:
            return self
        grid = [budget.eps for budget in self.budgets]
        if np.any(np.diff(grid) <= 0):
            raise ValueError(f"budgets must have increasing eps, not {grid}")
        served = [b for b in self.budgets if b.eps == self.threat_model.eps]
        if len(served) != 1 or served[0].threshold != self.threshold:
            raise ValueError(
                f"budgets {grid} must hold the served eps {self.threat_model.eps} with its λ"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _upgrade_schema_1(cls, data: Any) -> Any:
        """Read a version-1 record as version 2. The one field whose form changed is the
        threshold rule, one string (``match-fraction``, ``target-tpr@0.95``) that becomes a
        `ThresholdRuleSpec`; version 2's other changes only add (an estimate's ``bootstrap``,
        an interval that may be absent), so every other version-1 field reads as it is.

        Version 1 defaulted ``schema_version`` to 1, so a record without it is version 1 when
        its rule is a string. An unknown rule name fails the spec's own validation.
        """
        if not isinstance(data, dict) or data.get("schema_version", 1) != 1:
            return data
        rule = data.get("threshold_rule")
        if not isinstance(rule, str):
            return data
        name, at, target_tpr = rule.partition("@")
        spec = {"name": name, "target_tpr": target_tpr if at else None}
        return {**data, "schema_version": SCHEMA_VERSION, "threshold_rule": spec}
