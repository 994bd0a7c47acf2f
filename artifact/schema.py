"""The calibration artifact's schema: one pydantic model of plain data, written by the
calibration job and validated by the service. No torch, nothing pickled."""

from __future__ import annotations

from functools import cached_property
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

SCHEMA_VERSION: Literal[1] = 1
ONNX_FILE = "model.onnx"
RECORD_FILE = "calibration.json"
REPORT_FILE = "report.html"

Norm = Literal["linf", "l2"]
ScoreKind = Literal["logit-margin", "pseudo-margin"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ThreatModel(_Frozen):
    norm: Norm
    eps: float = Field(gt=0, description="perturbation budget in the input range [0, 1]")


class AttackBudget(_Frozen):
    name: str
    steps: int = Field(gt=0)
    succeeded: int = Field(ge=0, description="subset points where this attack found a flip")


class Curve(_Frozen):
    """A non-decreasing piecewise-linear function of the score, flat beyond its knots."""

    knots_x: list[float] = Field(min_length=1)
    knots_y: list[float] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> Curve:
        if len(self.knots_x) != len(self.knots_y):
            raise ValueError("knots_x and knots_y differ in length")
        if any(b < a for a, b in zip(self.knots_x, self.knots_x[1:], strict=False)):
            raise ValueError("knots_x must be sorted")
        if any(not 0.0 <= y <= 1.0 for y in self.knots_y):
            raise ValueError("knots_y are probabilities and must lie in [0, 1]")
        return self

    @cached_property
    def _knots(self) -> tuple[np.ndarray, np.ndarray]:
        # converted once: the service evaluates the curve on every batch
        return np.asarray(self.knots_x, dtype=np.float64), np.asarray(self.knots_y, np.float64)

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        knots_x, knots_y = self._knots
        return np.interp(scores, knots_x, knots_y)


class RobustAccuracyEstimate(_Frozen):
    method: Literal["count", "regression"]
    estimate: float = Field(ge=0, le=1)
    ci_low: float = Field(ge=0, le=1)
    ci_high: float = Field(ge=0, le=1)


class DataSource(_Frozen):
    dataset: str
    split: Literal["train", "test"]
    size: int = Field(gt=0)
    seed: int | None = None


class PseudoMarginFacts(_Frozen):
    """Held-out comparison of the learned pseudo-margin against the logit margin."""

    score_input: Literal["features", "logits"]
    hidden: int | None = Field(default=None, description="MLP hidden width (absent: 256)")
    layers: int | None = Field(default=None, description="MLP hidden layers (absent: 2)")
    train_points: int
    held_out_points: int
    logit_margin_tau: float
    logit_margin_auroc: float
    pseudo_margin_tau: float
    pseudo_margin_auroc: float
    chosen: bool


class CalibrationRecord(_Frozen):
    """`calibration.json`: what the service needs to flag, and what a person needs to trust it."""

    schema_version: Literal[1] = SCHEMA_VERSION
    model_name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    version: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    model_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    input_shape: list[int] = Field(min_length=1)
    input_range: tuple[float, float] = (0.0, 1.0)
    class_names: list[str] = Field(min_length=2)
    threat_model: ThreatModel
    score_kind: ScoreKind
    threshold: float = Field(description="λ: a prediction is brittle when score < λ")
    threshold_rule: str
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
    created_at: str
    duration_s: float = Field(ge=0)
    software: dict[str, str] = Field(default_factory=dict)
