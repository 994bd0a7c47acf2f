"""How the calibration job's settings are read and checked, field by field: the parsers of the
values a flag or a variable gives as text (`--attack fmn:200`, `--since 24h`, comma-separated
lists) and the checks that need no model and no data. `config.CalibrationConfig` attaches them
to its fields; they are plain functions, so that a parser is tested without building a config.

Each raises `ConfigError` naming the value and the flag that fixes it. Torch-free (the `cuda`
check imports torch only when asked for a CUDA device), like `config`, so that `--help`
answers without loading torch.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import re
from typing import TYPE_CHECKING

from pydantic import ValidationInfo

from marginwatch.artifact.schema import NAME_PATTERN
from marginwatch.artifact.store import reserved_version_problem
from marginwatch.calibration.attack_registry import SPECS

if TYPE_CHECKING:
    from marginwatch.calibration.config import CalibrationConfig

DEFAULT_STEPS = 100  # per attack, as in the paper
DURATION_UNITS_S: dict[str, float] = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class ConfigError(ValueError):
    """A setting that cannot work; the message says which and why."""


def parse_attack(text: str) -> tuple[str, int]:
    """`fmn` or `fmn:200`: an attack's name and its step budget."""
    name, _, steps = text.strip().partition(":")
    if name not in SPECS:
        raise ConfigError(f"unknown attack {name!r}: use one of {', '.join(sorted(SPECS))}")
    try:
        budget = int(steps) if steps else DEFAULT_STEPS
    except ValueError as error:
        raise ConfigError(f"attack budget must be an integer, got {text!r}") from error
    if budget < 1:
        raise ConfigError(f"attack {name} needs at least one step, got {budget}")
    return name, budget


def since_timestamp(text: str, now: float) -> float:
    """`--since` as unix seconds: a duration before `now` (`90m`, `24h`, `7d`) or an ISO time
    (`2026-12-01T00:00Z`; without a zone, UTC)."""
    duration = re.fullmatch(r"(\d+(?:\.\d+)?)([smhdw])", text.strip())
    if duration:
        return now - float(duration.group(1)) * DURATION_UNITS_S[duration.group(2)]
    try:
        moment = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ConfigError(
            f"since {text!r} is neither a duration (30m, 24h, 7d) nor an ISO time "
            "(2026-12-01T00:00Z)"
        ) from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)).timestamp()


def seed_of_version(version: str) -> int:
    """The seed a version name stands for: a rerun of `--version X` redraws X's subset."""
    return int.from_bytes(hashlib.sha256(version.encode()).digest()[:4], "big") >> 1


def since_readable(since: str) -> str:
    since_timestamp(since, 0.0)
    return since


def eps_positive(eps: float | None) -> float | None:
    # Not Field(gt=0), only for the message the job has always given (test_job matches it).
    if eps is not None and not eps > 0:
        raise ConfigError(f"eps must be positive, got {eps}")
    return eps


def split_numbers(value: object, info: ValidationInfo) -> object:
    """`--input-range`, `--mean`, `--std`: a comma-separated string from the variable, or a list
    of them from repeated flags."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list):
        value = tuple(part for item in value for part in str(item).split(",") if part.strip())
    if info.field_name == "eps_grid" and isinstance(value, tuple):
        check_grid(value)
    if info.field_name == "input_range" and isinstance(value, tuple) and len(value) != 2:
        shown = ",".join(map(str, value))
        raise ConfigError(f"input range takes two numbers, LOW,HIGH; got {shown}")
    return value


def check_grid(parts: tuple[object, ...]) -> None:
    """`--eps-grid`: positive numbers, refused with the flag's name (pydantic's message would
    name a tuple index)."""
    for part in parts:
        try:
            eps = float(str(part))
        except ValueError:
            raise ConfigError(f"--eps-grid takes numbers, EPS,EPS,...; got {part!r}") from None
        if not (eps > 0 and math.isfinite(eps)):
            raise ConfigError(f"--eps-grid budgets must be positive and finite, got {part}")


def split_names(value: object) -> object:
    # The variable's string, or the flag's list (repeatable); empty parts kept, to refuse.
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list):
        value = tuple(part.strip() for item in value for part in str(item).split(","))
    return value


def names_distinct(names: tuple[str, ...]) -> tuple[str, ...]:
    if "" in names:
        raise ConfigError(f"class names must not be empty, got {','.join(names)!r}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"each class is named once; repeated: {', '.join(repeated)}")
    return names


def version_is_a_name(version: str | None) -> str | None:
    # One path component in the store: `../x` or `.hidden` would escape or hide the version.
    if version is not None and not re.fullmatch(NAME_PATTERN, version):
        raise ConfigError(
            f"version {version!r} is not a valid name: letters, digits, '.', '_' and '-', "
            "starting with a letter or digit"
        )
    reserved = None if version is None else reserved_version_problem(version)
    if reserved is not None:
        raise ConfigError(f"{reserved}: choose another --version")
    return version


def std_positive(std: tuple[float, ...]) -> tuple[float, ...]:
    if not std or not all(value > 0 for value in std):
        raise ConfigError(f"std must be positive, got {std}")
    return std


def range_increasing(bounds: tuple[float, float]) -> tuple[float, float]:
    if not bounds[0] < bounds[1]:
        raise ConfigError(f"input range must have LOW < HIGH, got {bounds}")
    return bounds


def parse_attacks(value: object) -> object:
    # A string from the variable, a list from repeated flags, or name-steps pairs from code.
    if isinstance(value, str):
        value = [part for part in value.split(",") if part.strip()]
    if isinstance(value, list | tuple):
        return tuple(parse_attack(item) if isinstance(item, str) else item for item in value)
    return value


def known_device(device: str) -> str:
    if device not in {"auto", "cpu", "cuda"} and not device.startswith("cuda:"):
        raise ConfigError(f"device must be auto, cpu or cuda[:N], got {device!r}")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("device cuda asked for, but torch sees no CUDA device")
    return device


def check_consistent(config: CalibrationConfig) -> None:
    """The checks across fields: attacks against the norm, sharding, the traffic mode, and the
    name the model gets in the store."""
    names = [name for name, _ in config.resolved_attacks]
    for name in names:
        if config.norm not in SPECS[name].norms:
            raise ConfigError(f"attack {name} does not support the {config.norm} norm")
    if len(set(names)) != len(names):
        raise ConfigError(f"each attack may appear once, got {names}")
    if config.shard is not None and config.shard >= config.num_shards:
        raise ConfigError(f"shard must lie in [0, {config.num_shards}), got {config.shard}")
    if config.shard is not None and "seed" not in config.model_fields_set:
        # each pod would draw its own subset and the merge would find none of their chunks
        raise ConfigError(
            "--shard needs the same subset in every shard and in the merge: give them all "
            "the same --seed (or --version)"
        )
    if config.refit and config.traffic is None:
        raise ConfigError("--refit refits λ on traffic: give --traffic DIR")
    if config.traffic is not None and (
        config.shard is not None or config.merge_only or config.preflight_only
    ):
        raise ConfigError(
            "--traffic runs its own checks before any attack and is not sharded: drop "
            "--shard, --merge and --preflight-only"
        )
    if not re.fullmatch(NAME_PATTERN, config.resolved_model_name):
        raise ConfigError(
            f"{config.resolved_model_name!r} (from --model) cannot name a model in the store: "
            "give --name with letters, digits, '.', '_' and '-'"
        )
