"""Minimum-norm attacks, each a pure function
`attack(model, inputs, labels, *, norm, steps, ...) -> adv_inputs`.

Every attack returns the original input where it failed, so success must be re-checked on the
model (`calibration.margins.input_margins` does). Other libraries' attacks plug in through
`functools.partial` as long as they keep that signature.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from marginwatch.calibration.attacks import _common
from marginwatch.calibration.attacks._common import perturbation_norm
from marginwatch.calibration.attacks.ddn import ddn
from marginwatch.calibration.attacks.fab import fab
from marginwatch.calibration.attacks.fmn import fmn

Attack = Callable[..., torch.Tensor]

# FAB against only the three runner-up classes: a third of full FAB's cost on 10 classes, and on
# the reference CNN within 1 % of its radius on 93 % of points (bench/attack_cost.py).
fab_top3: Attack = functools.partial(fab, candidates=3)

ATTACKS: dict[str, Attack] = {"fmn": fmn, "ddn": ddn, "fab": fab, "fab-top3": fab_top3}

SUPPORTED_NORMS: dict[str, tuple[float, ...]] = {
    **_common.SUPPORTED_NORMS,
    "fab-top3": _common.SUPPORTED_NORMS["fab"],
}


def parse_norm(text: str | float) -> float:
    """'inf', 'linf', '∞' → inf; '2', 'l2' → 2.0 (for command lines and config files)."""
    if isinstance(text, int | float):
        return float(text)
    cleaned = text.strip().lower().removeprefix("l")
    if cleaned in {"inf", "∞"}:
        return math.inf
    try:
        return float(cleaned)
    except ValueError as error:
        raise ValueError(f"not a norm: {text!r}") from error


def supported_norms(name: str) -> tuple[float, ...]:
    """The norms the attack registered as `name` supports."""
    if name not in SUPPORTED_NORMS:
        raise ValueError(f"unknown attack {name!r}: use one of {', '.join(ATTACKS)}")
    return SUPPORTED_NORMS[name]


def attacks_for_norm(norm: float) -> dict[str, Attack]:
    """The registered attacks that support `norm`, by name."""
    return {
        name: attack
        for name, attack in ATTACKS.items()
        if any(norm == allowed for allowed in SUPPORTED_NORMS[name])
    }


__all__ = [
    "ATTACKS",
    "SUPPORTED_NORMS",
    "Attack",
    "attacks_for_norm",
    "ddn",
    "fab",
    "fmn",
    "parse_norm",
    "perturbation_norm",
    "supported_norms",
]
