"""A request's perturbation budget: `"eps": 0.05` in a v1 body or form, `parameters.eps` in an
Open Inference Protocol v2 request (REST or gRPC). A budget is one of the served version's grid
(`artifact.answers`); it picks the λ the flags are computed at and the `p_robust` curve, and is
resolved before the model runs, so a budget off the grid costs no inference. Leaving it out
answers at the served ε.
"""

from __future__ import annotations

import math
from typing import Any

from marginwatch.artifact.answers import BudgetNotInGrid
from marginwatch.service.engine import Prediction, ServedModel
from marginwatch.service.errors import InvalidInput, UnknownBudget

EPS = "eps"


def eps_value(value: object, where: str) -> float:
    """A budget as a request states it: a positive finite number (JSON's, not a string or a
    boolean), else 400."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(f"{where} must be a number (a perturbation budget), not {value!r:.40}")
    eps = float(value)
    if not (math.isfinite(eps) and eps > 0):
        raise InvalidInput(f"{where} must be a positive finite number, not {value!r:.40}")
    return eps


def parameters_eps(parameters: dict[str, Any]) -> float | None:
    """`parameters.eps` of a v2 request, or None."""
    if EPS not in parameters:
        return None
    return eps_value(parameters[EPS], "parameters.eps")


def budget_index(model: ServedModel, eps: float | None) -> int:
    """The grid index of `eps` for `model`'s loaded version (None: the served budget); 422 with
    the grid when the version has no answers at `eps`."""
    try:
        return model.answers.budget_index(eps)
    except BudgetNotInGrid as error:
        raise UnknownBudget(str(error)) from None


def at_budget(model: ServedModel, prediction: Prediction, budget: int) -> Prediction:
    """`prediction` answered at grid budget `budget` of `model`'s version."""
    return prediction.at_budget(model.answers, budget, model.record.guard_band)


def budget_facts(model: ServedModel, budget: int) -> dict[str, float]:
    """A v2 response's parameters of the budget answered: ε', its λ and its robust accuracy
    (the rest of the calibration's facts are the served budget's)."""
    chosen = model.answers.budgets[budget]
    return {
        "threshold": chosen.threshold,
        EPS: chosen.eps,
        "robust_accuracy": chosen.robust_accuracy,
    }
