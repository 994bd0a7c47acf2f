"""The record schema: version-1 artifacts still load (upgraded on read), version-2 records
round-trip, and the typed threshold rule and estimate refuse what they cannot mean."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from marginwatch.artifact import store
from marginwatch.artifact.schema import (
    ONNX_FILE,
    RECORD_FILE,
    SCHEMA_VERSION,
    CalibrationRecord,
    RobustAccuracyEstimate,
    ThresholdRuleSpec,
)

SHIPPED = Path(__file__).resolve().parents[2] / "artifacts" / "fmnist-cnn-pgd" / "20261125T192841Z"


def shipped_json() -> dict[str, Any]:
    """The shipped calibration.json, written by the job under schema version 1."""
    data: dict[str, Any] = json.loads((SHIPPED / RECORD_FILE).read_text())
    assert data["schema_version"] == 1 and data["threshold_rule"] == "match-fraction"
    return data


def test_shipped_version_1_artifact_still_verifies_and_is_upgraded() -> None:
    record = store.read_record(SHIPPED)  # the service's path: schema and model.onnx hash
    assert record.schema_version == SCHEMA_VERSION == 2
    assert record.threshold_rule == ThresholdRuleSpec(name="match-fraction")
    assert record.robust_accuracy.bootstrap is None  # version 1 did not record it
    assert record.robust_accuracy.ci_low is not None


@pytest.mark.parametrize(
    ("rule", "spec"),
    [
        ("match-fraction", ThresholdRuleSpec(name="match-fraction")),
        ("target-tpr@0.95", ThresholdRuleSpec(name="target-tpr", target_tpr=0.95)),
        ("target-tpr@1", ThresholdRuleSpec(name="target-tpr", target_tpr=1.0)),
    ],
)
def test_version_1_rule_string_becomes_the_typed_spec(rule: str, spec: ThresholdRuleSpec) -> None:
    data = shipped_json() | {"threshold_rule": rule}
    record = CalibrationRecord.model_validate_json(json.dumps(data))
    assert record.threshold_rule == spec
    assert str(record.threshold_rule) == rule  # the display form is version 1's spelling


def test_version_1_without_schema_version_is_read_as_version_1() -> None:
    data = shipped_json()
    del data["schema_version"]  # version 1 defaulted it, so it may be absent
    assert CalibrationRecord.model_validate(data).threshold_rule.name == "match-fraction"


def test_version_2_record_round_trips(tmp_path: Path) -> None:
    data = shipped_json() | {"threshold_rule": "target-tpr@0.9"}
    record = CalibrationRecord.model_validate(data)
    written = json.loads(record.model_dump_json())
    assert written["schema_version"] == 2
    assert written["threshold_rule"] == {"name": "target-tpr", "target_tpr": 0.9}
    assert CalibrationRecord.model_validate(written) == record
    # and through the store, as the job writes it and the service reads it
    staging = tmp_path / "version"
    staging.mkdir()
    shutil.copyfile(SHIPPED / ONNX_FILE, staging / ONNX_FILE)
    store.write_record(staging, record)
    assert store.read_record(staging) == record


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"name": "target-tpr"}, "'target-tpr' needs target_tpr in \\(0, 1\\]"),
        ({"name": "target-tpr", "target_tpr": 1.5}, "less than or equal to 1"),
        ({"name": "target-tpr", "target_tpr": 0.0}, "greater than 0"),
        ({"name": "match-fraction", "target_tpr": 0.9}, "'match-fraction' takes no target_tpr"),
        ({"name": "median"}, "'match-fraction' or 'target-tpr'"),
    ],
)
def test_invalid_threshold_rule_is_rejected_with_its_reason(
    rule: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        ThresholdRuleSpec.model_validate(rule)
    data = shipped_json() | {"schema_version": 2, "threshold_rule": rule}
    with pytest.raises(ValidationError, match=message):
        CalibrationRecord.model_validate(data)


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ("target-tpr", "'target-tpr' needs target_tpr"),
        ("target-tpr@1.5", "less than or equal to 1"),
        ("test: median score", "'match-fraction' or 'target-tpr'"),
    ],
)
def test_invalid_version_1_rule_string_is_rejected(rule: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        CalibrationRecord.model_validate(shipped_json() | {"threshold_rule": rule})


def test_version_2_refuses_the_version_1_string() -> None:
    data = shipped_json() | {"schema_version": 2}
    with pytest.raises(ValidationError, match="threshold_rule"):
        CalibrationRecord.model_validate(data)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"ci_low": None, "ci_high": 0.6}, "both given or both absent"),
        ({"ci_low": 0.6, "ci_high": 0.5}, "exceeds ci_high"),
        ({"ci_low": 0.4, "ci_high": 0.6, "bootstrap": 0}, "bootstrap = 0 has none"),
        ({"ci_low": None, "ci_high": None, "bootstrap": 100}, "bootstrap = 0 has none"),
        ({"ci_low": float("nan"), "ci_high": 0.6}, "ci_low"),
    ],
)
def test_estimate_interval_is_consistent(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        RobustAccuracyEstimate.model_validate({"method": "count", "estimate": 0.5} | fields)
    point_only = {"method": "count", "estimate": 0.5, "ci_low": None, "ci_high": None}
    assert RobustAccuracyEstimate.model_validate(point_only | {"bootstrap": 0}).ci_low is None


def test_older_pseudo_margin_facts_read_as_unguarded() -> None:
    facts = store.read_record(SHIPPED).pseudo_margin
    assert facts is not None and facts.chosen
    assert facts.guard_scale is None and facts.choice is None  # issue 10's fields are optional
    assert facts.path_points is None and facts.guard_share is None


def score_figures(name: str, auroc: float) -> dict[str, Any]:
    return {"name": name, "kendall_tau": 0.6, "auroc": auroc, "threshold": 0.3,
            "estimate": 0.7, "estimate_spread": 0.02, "multiply_adds": 0}  # fmt: skip


def test_score_choice_round_trips_in_a_record() -> None:
    choice = {"candidates": [score_figures("logit-margin", 0.93), score_figures("guarded", 0.95)],
              "chosen": "guarded", "reason": "buys AUROC", "min_auroc_gain": 0.005,
              "min_tau_gain": 0.05, "min_spread_gain": 0.05}  # fmt: skip
    data = shipped_json()
    data["pseudo_margin"] |= {"guard_scale": 0.25, "choice": choice, "path_points": 3992,
                              "guard_share": 0.25}  # fmt: skip
    record = CalibrationRecord.model_validate(data)
    assert record.pseudo_margin is not None and record.pseudo_margin.choice is not None
    assert record.pseudo_margin.choice.candidates[1].boundary_recall is None
    assert CalibrationRecord.model_validate_json(record.model_dump_json()) == record
    with pytest.raises(ValidationError, match="guard_scale"):
        CalibrationRecord.model_validate(
            data | {"pseudo_margin": data["pseudo_margin"] | {"guard_scale": 0}}
        )
    with pytest.raises(ValidationError, match="path_points"):
        CalibrationRecord.model_validate(
            data | {"pseudo_margin": data["pseudo_margin"] | {"path_points": -1}}
        )
