"""The registered minimum-norm attacks, one line each: name, the norms it attacks in, a one-line
help and the module of `calibration/attacks/` whose function of the same name runs it. A new
attack is its module plus one line in `REGISTERED`; `calibration.attacks.ATTACKS` (the
functions), each attack's norm check, the job's `--attack` check and its help are read from here.

Torch-free, unlike the attacks themselves, so that `marginwatch-calibrate --help` and the
configuration's checks answer without loading torch (seconds).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from marginwatch.artifact.schema import Norm

NORM_VALUES: Mapping[Norm, float] = MappingProxyType({"linf": math.inf, "l2": 2.0})


@dataclass(frozen=True)
class AttackSpec:
    """One registered attack; `options` are keyword options bound to its function
    (`functools.partial`), which makes a variant (`fab-top3`) an attack of its own."""

    name: str
    norms: tuple[Norm, ...]
    help: str
    module: str
    options: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def norm_values(self) -> tuple[float, ...]:
        """The norms as the attack functions take them (`inf`, `2.0`)."""
        return tuple(NORM_VALUES[norm] for norm in self.norms)


_FAB_TOP3 = MappingProxyType({"candidates": 3})
REGISTERED: tuple[AttackSpec, ...] = (
    AttackSpec("fmn", ("linf", "l2"), "Fast Minimum-Norm (Pintor et al., NeurIPS 2021)", "fmn"),
    AttackSpec("fab", ("linf", "l2"), "FAB, every class (Croce & Hein, ICML 2020)", "fab"),
    # On the reference CNN within 1 % of full FAB's radius on 93 % of points (bench/attack_cost.py)
    AttackSpec("fab-top3", ("linf", "l2"), "FAB, three runner-up classes", "fab", _FAB_TOP3),
    AttackSpec("ddn", ("l2",), "Decoupled Direction and Norm (Rony et al., CVPR 2019)", "ddn"),
)
SPECS: Mapping[str, AttackSpec] = MappingProxyType({spec.name: spec for spec in REGISTERED})


def attack_spec(name: str) -> AttackSpec:
    """The attack registered as `name`; `ValueError` naming the registered ones otherwise."""
    if name not in SPECS:
        raise ValueError(f"unknown attack {name!r}: use one of {', '.join(SPECS)}")
    return SPECS[name]


def attacks_help() -> str:
    """Each attack's name, norms and help, for a command line's `--attack`."""
    return "; ".join(f"{spec.name} ({', '.join(spec.norms)}): {spec.help}" for spec in REGISTERED)
