"""The served answers' evaluation (`artifact.answers`) and their schema: the budget grid, the
runner-up, margin quantiles, and older records that have none of it."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from marginwatch.artifact.answers import BudgetNotInGrid, answers_of, runner_up
from marginwatch.artifact.schema import (
    BudgetAnswers,
    CalibrationRecord,
    Curve,
    MarginQuantiles,
)
from marginwatch.artifact.store import current_dir, default_store, read_record

GRID = (0.025, 0.05, 0.1, 0.2)


def shipped() -> CalibrationRecord:
    return read_record(current_dir(default_store(), "fmnist-cnn-pgd"))


def with_grid(record: CalibrationRecord) -> CalibrationRecord:
    """`record` with a budget grid around its λ (λ grows with ε') and margin quantiles."""
    budgets = [
        BudgetAnswers(
            eps=eps,
            threshold=record.threshold
            if eps == record.threat_model.eps
            else record.threshold * eps / 0.1,
            robust_accuracy=record.robust_accuracy,
            subset_nonrobust=min(1.0, eps * 2),
            p_robust=Curve(knots_x=[0.0, 1.0 + 10 * eps], knots_y=[0.0, 1.0]),
            live_curve=record.live_curve,
        )
        for eps in GRID
    ]
    quantiles = MarginQuantiles(
        levels=[0.1, 0.5, 0.9],
        knots_x=[0.0, 2.0],
        knots_y=[[0.0, 0.1], [0.02, 0.2], [0.05, 0.4]],
        interval=0.8,
    )
    return record.model_copy(update={"budgets": budgets, "margin_quantiles": quantiles})


def test_runner_up_is_the_best_other_class_even_in_a_tie() -> None:
    logits = np.array([[3.0, 1.0, 2.0], [5.0, 5.0, 0.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    labels = logits.argmax(axis=1)
    assert runner_up(logits, labels).tolist() == [2, 1, 1]
    assert np.all(runner_up(logits, labels) != labels)


def test_budget_index_matches_the_grid_within_rounding() -> None:
    answers = answers_of(with_grid(shipped()))
    assert answers.grid == list(GRID)
    assert answers.budget_index(None) == answers.served == 2
    assert answers.budget_index(0.05) == 1
    assert answers.budget_index(0.1 / 4 * (1 + 1e-9)) == 0
    with pytest.raises(BudgetNotInGrid, match=r"\[0.025, 0.05, 0.1, 0.2\]"):
        answers.budget_index(0.3)


def test_answers_evaluate_the_curves() -> None:
    answers = answers_of(with_grid(shipped()))
    scores = np.array([0.0, 1.0, 2.0, 9.0], dtype=np.float32)
    _, low, estimate, high = answers.served_answers(scores)
    np.testing.assert_allclose(estimate, [0.02, 0.11, 0.2, 0.2], rtol=1e-6)
    assert np.all(low <= estimate) and np.all(estimate <= high)
    p_small, p_large = answers.p_robust(scores, 0), answers.p_robust(scores, 3)
    assert np.all(p_small >= p_large) and p_small[1] > p_large[1]


def test_an_older_record_serves_its_eps_alone_and_no_curves() -> None:
    record = shipped().model_copy(update={"budgets": None, "margin_quantiles": None})
    answers = answers_of(record)
    assert answers.grid == [record.threat_model.eps]
    assert answers.budgets[0].threshold == record.threshold
    assert np.isnan(answers.p_robust(np.zeros(2, np.float32), 0)).all()
    assert np.isnan(answers.served_answers(np.zeros(2, np.float32))).all()


def test_the_record_holds_the_served_budget_with_its_lambda() -> None:
    record = with_grid(shipped())
    data = record.model_dump()
    CalibrationRecord.model_validate(data)  # the grid as built is valid
    without_served = {**data, "budgets": [b for b in data["budgets"] if b["eps"] != 0.1]}
    with pytest.raises(ValidationError, match="served eps"):
        CalibrationRecord.model_validate(without_served)
    other_lambda = [
        {**b, "threshold": b["threshold"] + 1} if b["eps"] == 0.1 else b for b in data["budgets"]
    ]
    with pytest.raises(ValidationError, match="served eps"):
        CalibrationRecord.model_validate({**data, "budgets": other_lambda})
    with pytest.raises(ValidationError, match="increasing"):
        CalibrationRecord.model_validate({**data, "budgets": data["budgets"][::-1]})
    with pytest.raises(ValidationError, match="one count per class"):
        CalibrationRecord.model_validate({**data, "predicted_class_counts": [1, 2]})


def test_margin_quantiles_must_be_monotone() -> None:
    with pytest.raises(ValidationError, match="non-decreasing"):
        MarginQuantiles(
            levels=[0.1, 0.9], knots_x=[0.0, 1.0], knots_y=[[0.2, 0.1], [0.3, 0.4]], interval=0.8
        )
    with pytest.raises(ValidationError, match="non-decreasing"):
        MarginQuantiles(
            levels=[0.1, 0.9], knots_x=[0.0, 1.0], knots_y=[[0.2, 0.3], [0.1, 0.4]], interval=0.8
        )
    with pytest.raises(ValidationError, match="levels must increase"):
        MarginQuantiles(levels=[0.9, 0.1], knots_x=[0.0], knots_y=[[0.1], [0.2]], interval=0.8)


def test_served_answers_are_the_curves_for_one_score_and_for_many() -> None:
    """The shared-knot table (and its one-score path) equals each curve evaluated alone."""
    answers = answers_of(with_grid(shipped()))
    scores = np.array([-5.0, 0.0, 0.3, 1.0, 1.7, 2.0, 9.0], dtype=np.float32)
    many = answers.served_answers(scores)
    record = with_grid(shipped())
    assert record.budgets is not None and record.margin_quantiles is not None
    curves = [record.budgets[2].p_robust(scores), *record.margin_quantiles(scores)]
    np.testing.assert_allclose(many, curves, atol=1e-7)
    for i in range(len(scores)):
        np.testing.assert_allclose(
            answers.served_answers(scores[i : i + 1])[:, 0], many[:, i], atol=1e-12
        )
    old = answers_of(shipped().model_copy(update={"budgets": None, "margin_quantiles": None}))
    assert np.isnan(old.served_answers(scores[:1])).all() and old.served_answers(scores).shape == (
        4,
        7,
    )


def test_runner_up_of_one_row_and_of_a_wide_batch_agree() -> None:
    rng = np.random.default_rng(0)
    for classes in (2, 10, 100):
        logits = rng.normal(size=(5, classes)).astype(np.float32)
        labels = logits.argmax(axis=1)
        batch = runner_up(logits, labels)
        assert [
            runner_up(logits[i : i + 1], labels[i : i + 1])[0] for i in range(5)
        ] == batch.tolist()
        np.testing.assert_array_equal(batch, np.argsort(logits, axis=1)[:, -2])
