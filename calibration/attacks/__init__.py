"""Minimum-norm attacks, each a pure function
`attack(model, inputs, labels, *, norm, steps, ...) -> adv_inputs`.

Every attack returns the original input where it failed, so success must be re-checked on the
model (`calibration.margins.input_margins` does). Other libraries' attacks plug in through
`functools.partial` as long as they keep that signature. Which attacks exist, with their norms
and help, is one line each in `calibration/attack_registry.py`.
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable

import torch

from marginwatch.calibration.attack_registry import REGISTERED, SPECS, AttackSpec, attack_spec
from marginwatch.calibration.attacks._common import perturbation_norm
from marginwatch.calibration.attacks.ddn import ddn
from marginwatch.calibration.attacks.fab import fab
from marginwatch.calibration.attacks.fmn import fmn

Attack = Callable[..., torch.Tensor]


def _function(spec: AttackSpec) -> Attack:
    """The registered attack's function: `<module>.<module>`, with its options bound."""
    function: Attack = getattr(importlib.import_module(f"{__name__}.{spec.module}"), spec.module)
    return functools.partial(function, **spec.options) if spec.options else function


# The functions and norms, by name, read from the one registry (`calibration/attack_registry.py`).
ATTACKS: dict[str, Attack] = {spec.name: _function(spec) for spec in REGISTERED}
SUPPORTED_NORMS: dict[str, tuple[float, ...]] = {spec.name: spec.norm_values for spec in REGISTERED}


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
    return attack_spec(name).norm_values


def attacks_for_norm(norm: float) -> dict[str, Attack]:
    """The registered attacks that support `norm`, by name."""
    return {
        name: attack
        for name, attack in ATTACKS.items()
        if any(norm == allowed for allowed in SUPPORTED_NORMS[name])
    }


__all__ = [
    "ATTACKS",
    "SPECS",
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
