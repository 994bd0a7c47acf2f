"""The calibration job's settings, checked up front so bad input fails before any work."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from marginwatch.artifact.schema import Norm
from marginwatch.calibration.attacks import ATTACKS, SUPPORTED_NORMS
from marginwatch.calibration.margin_cache import AttackPlan
from marginwatch.calibration.threshold import THRESHOLD_RULES

DEFAULT_EPS: dict[str, float] = {"linf": 0.1, "l2": 1.5}
DEFAULT_ATTACKS: dict[str, tuple[str, ...]] = {"linf": ("fmn", "fab-top3"), "l2": ("fmn", "ddn")}
NORM_VALUES: dict[str, float] = {"linf": math.inf, "l2": 2.0}
PseudoMarginMode = Literal["auto", "always", "never"]


class ConfigError(ValueError):
    """A setting that cannot work; the message says which and why."""


def parse_attack(text: str) -> tuple[str, int]:
    """`fmn` or `fmn:200` (name and step budget; 100 steps by default, as in the paper)."""
    name, _, steps = text.partition(":")
    if name not in ATTACKS:
        raise ConfigError(f"unknown attack {name!r}: use one of {', '.join(sorted(ATTACKS))}")
    try:
        budget = int(steps) if steps else 100
    except ValueError as error:
        raise ConfigError(f"attack budget must be an integer, got {text!r}") from error
    if budget < 1:
        raise ConfigError(f"attack {name} needs at least one step, got {budget}")
    return name, budget


@dataclass(frozen=True)
class CalibrationConfig:
    model: str
    store: Path
    weights: Path | None = None
    model_name: str | None = None
    dataset: str = "fashion-mnist"
    data_dir: Path | None = None
    split: Literal["train", "test"] = "test"
    subset_size: int = 500
    seed: int = 0
    norm: Norm = "linf"
    eps: float | None = None
    attacks: tuple[tuple[str, int], ...] = ()
    attack_batch_size: int = 100
    threshold_rule: str = "match-fraction"
    target_tpr: float = 0.95
    estimator: Literal["count", "regression"] = "regression"
    bootstrap: int = 1000
    pseudo_margin: PseudoMarginMode = "auto"
    tau_cutoff: float = 0.6
    pseudo_train_size: int = 1000
    pseudo_input: Literal["features", "logits"] = "features"
    pseudo_epochs: int = 500
    pseudo_hidden: int = 64
    pseudo_layers: int = 2
    device: str = "auto"
    shard: int | None = None
    num_shards: int = 1
    merge_only: bool = False
    version: str | None = None
    progress: bool = True
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check_numbers()
        if self.norm not in NORM_VALUES:
            raise ConfigError(f"norm must be linf or l2, got {self.norm!r}")
        for name, _ in self.resolved_attacks:
            if NORM_VALUES[self.norm] not in SUPPORTED_NORMS[name]:
                raise ConfigError(f"attack {name} does not support the {self.norm} norm")
        names = [name for name, _ in self.resolved_attacks]
        if len(set(names)) != len(names):
            raise ConfigError(f"each attack may appear once, got {names}")
        if self.threshold_rule not in THRESHOLD_RULES:
            rules = ", ".join(THRESHOLD_RULES)
            raise ConfigError(f"unknown threshold rule {self.threshold_rule!r}: use {rules}")
        if self.device not in {"auto", "cpu", "cuda"} and not self.device.startswith("cuda:"):
            raise ConfigError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError("device cuda asked for, but torch sees no CUDA device")

    def _check_numbers(self) -> None:
        if self.eps is not None and not self.eps > 0:
            raise ConfigError(f"eps must be positive, got {self.eps}")
        if self.subset_size < 2:
            raise ConfigError(f"the subset needs at least 2 points, got {self.subset_size}")
        if self.num_shards < 1 or (
            self.shard is not None and not 0 <= self.shard < self.num_shards
        ):
            raise ConfigError(f"shard must lie in [0, {self.num_shards}), got {self.shard}")
        if not 0 < self.target_tpr < 1:
            raise ConfigError(f"target TPR must lie in (0, 1), got {self.target_tpr}")
        if self.pseudo_hidden < 1 or self.pseudo_layers < 0:
            raise ConfigError("the pseudo-margin MLP needs hidden width ≥ 1 and layers ≥ 0")
        if self.bootstrap < 10 or self.attack_batch_size < 1 or self.pseudo_train_size < 10:
            raise ConfigError("bootstrap ≥ 10, attack batch size ≥ 1, pseudo-train size ≥ 10")

    @property
    def resolved_eps(self) -> float:
        return self.eps if self.eps is not None else DEFAULT_EPS[self.norm]

    @property
    def resolved_attacks(self) -> tuple[tuple[str, int], ...]:
        return self.attacks or tuple((name, 100) for name in DEFAULT_ATTACKS[self.norm])

    @property
    def attack_plan(self) -> AttackPlan:
        names = tuple(name for name, _ in self.resolved_attacks)
        steps = tuple(steps for _, steps in self.resolved_attacks)
        return AttackPlan(names, steps, NORM_VALUES[self.norm])

    @property
    def resolved_model_name(self) -> str:
        if self.model_name:
            return self.model_name
        source = self.weights if self.weights is not None else Path(self.model.split(":")[-1])
        return source.stem if source.suffix else source.name

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)
