"""The calibration job's settings, written once: this model is the job's configuration, its
environment variables (`MARGINWATCH_CALIBRATE_<FIELD>`, for the CronJob) and, generated from it,
its command line (`calibration/__main__.py`: flag, help, default and choices per field).

Every field is documented and constrained, and a bad value fails at construction with pydantic's
`ValidationError` naming the field, before any work; checks that need the model or the data
raise `ConfigError` in `preflight` (before any attack). torch and the attack registry are
imported where they are used, so that `--help`, which reads this module, answers without
loading torch (about 3 s). The parsers and the checks of single fields are plain functions in
`config_parsing`; this module attaches them to the fields.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from marginwatch.artifact.schema import Norm, TargetTpr, ThresholdRuleName
from marginwatch.artifact.store import default_store
from marginwatch.calibration import config_parsing as parsing
from marginwatch.calibration.attack_registry import NORM_VALUES, attacks_help
from marginwatch.calibration.config_parsing import (
    DEFAULT_STEPS,
    ConfigError,
    seed_of_version,
    since_timestamp,
)
from marginwatch.models.data import DATASETS

if TYPE_CHECKING:
    import torch

    from marginwatch.calibration.margin_cache import AttackPlan

# ConfigError and since_timestamp live in config_parsing and are kept importable from here, where
# the job's modules and the tests have always found them.
__all__ = [
    "DEFAULT_ATTACKS",
    "DEFAULT_EPS",
    "ENV_PREFIX",
    "HELP_GROUPS",
    "MIN_PSEUDO_TRAIN_POINTS",
    "NORM_VALUES",
    "CalibrationConfig",
    "CalibrationError",
    "ConfigError",
    "PseudoMarginMode",
    "since_timestamp",
]

ENV_PREFIX = "MARGINWATCH_CALIBRATE_"
DEFAULT_EPS: dict[str, float] = {"linf": 0.1, "l2": 1.5}
DEFAULT_ATTACKS: dict[str, tuple[str, ...]] = {"linf": ("fmn", "fab-top3"), "l2": ("fmn", "ddn")}
PseudoMarginMode = Literal["auto", "always", "never"]
MIN_PSEUDO_TRAIN_POINTS = 50
"""Attacked training points (outside the subset) that a pseudo-margin needs: with fewer, a
regressor on 128 features learns noise, and the held-out comparison cannot tell."""

# `--help` groups: each starts at the field named here and runs, in field order, to the next.
HELP_GROUPS: dict[str, str] = {
    "model": "model and data",
    "subset_size": "attacks and threat model",
    "threshold_rule": "threshold, estimators, pseudo-margin",
    "store": "store, sharding, output",
    "traffic": "traffic check (label-free, on the service's sampled traffic)",
}


class CalibrationError(Exception):
    """The job cannot produce a trustworthy version (a verification failed)."""


def _default_plan(norm: str) -> str:
    return " and ".join(f"{name}:{DEFAULT_STEPS}" for name in DEFAULT_ATTACKS[norm])


_MEAN_HELP = (
    "per-channel mean the model subtracts after --input-range (one value, or one per channel); "
    "inside the attacked model and the exported graph, like --std"
)
_STD_HELP = "per-channel standard deviation the model divides by (one, or one per channel)"


class CalibrationConfig(BaseSettings):
    """Configuration of one `marginwatch-calibrate` run."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    model: str = Field(
        default="fmnist-cnn-pgd",
        min_length=1,
        description=(
            "shipped model, architecture name (with --weights), a model file (TorchScript or "
            "torch.export .pt/.pt2, ONNX .onnx), or package.module:factory"
        ),
    )
    weights: Path | None = Field(default=None, description="weights file for --model")
    model_name: str | None = Field(
        default=None,
        min_length=1,
        description="name in the store (default: the model or weights file name)",
        json_schema_extra={"flag": "--name"},
    )
    # NoDecode, as for --attack: the variables are comma-separated (`0.485,0.456,0.406`). The
    # three describe the model's own input; the served graph takes [0, 1] whatever they say.
    input_range: Annotated[tuple[float, float], NoDecode] = Field(
        default=(0.0, 1.0),
        description=(
            "the input range the model expects, LOW,HIGH (say 0,255): [0, 1] inputs are scaled "
            "to it inside the attacked model and the exported graph; ε stays in [0, 1] units"
        ),
        json_schema_extra={"metavar": "LOW,HIGH"},
    )
    mean: Annotated[tuple[float, ...], NoDecode] = Field(
        default=(0.0,), description=_MEAN_HELP, json_schema_extra={"metavar": "M[,M,...]"}
    )
    std: Annotated[tuple[float, ...], NoDecode] = Field(
        default=(1.0,), description=_STD_HELP, json_schema_extra={"metavar": "S[,S,...]"}
    )
    dataset: str = Field(
        default="fashion-mnist",
        min_length=1,
        description=f"{', '.join(DATASETS)}, an .npz path, or an image folder (one sub-folder "
        "of PNG/JPEG/WebP files per class, or train/ and test/ of them)",
    )
    data_dir: Path | None = Field(
        default=None,
        description=(
            "folder of the dataset files (Fashion-MNIST: default "
            "$MARGINWATCH_FASHION_MNIST_DIR, then Debian's dataset-fashion-mnist)"
        ),
    )
    split: Literal["train", "test"] = Field(
        default="test",
        description=(
            "split to calibrate on; its full size is the large set of the robust-accuracy estimate"
        ),
    )
    # NoDecode: the variable is comma-separated, like the flag (`Ankle boot,Bag,Coat`).
    class_names: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(),
        description=(
            "the model's classes in label order (label i is the class named i-th), served as "
            "the class names: an image folder's class folders, every one named (default: "
            "sorted by name); an .npz's names when it has none; or a dataset's own names "
            "reordered. Preflight refuses a subset whose labels look permuted and prints the "
            "likely order"
        ),
        json_schema_extra={"metavar": "NAME,NAME,..."},
    )
    # Not given and more than the data holds: all of it, with a note (`inputs.subset_size`).
    subset_size: int = Field(default=500, ge=2, description="points to attack")
    seed: int = Field(
        default_factory=lambda: secrets.randbelow(2**31),
        ge=0,
        description=(
            "seed of the subset, the traffic sample and the fits (default: fresh each run, or "
            "derived from --version when given, so that rerunning a killed --version X redraws "
            "its subset and resumes from its cached attacks); recorded in the artifact"
        ),
    )
    norm: Norm = Field(default="linf", description="threat model")
    eps: float | None = Field(
        default=None,
        description="budget ε (default: "
        + ", ".join(f"{eps:g} for {norm}" for norm, eps in DEFAULT_EPS.items())
        + ")",
    )
    # NoDecode: comma-separated in the variable too (`0.025,0.05,0.1,0.2`).
    eps_grid: Annotated[tuple[float, ...], NoDecode] = Field(
        default=(),
        description=(
            "budgets ε' the version also answers for, from the margins already measured (λ, "
            "robust accuracy, p_robust at each; a request picks one with eps); the served ε is "
            "always among them (default: ε/4, ε/2, ε, 2ε)"
        ),
        json_schema_extra={"metavar": "EPS,EPS,..."},
    )
    margin_interval: float = Field(
        default=0.8,
        gt=0,
        lt=1,
        description="coverage of the served margin interval [margin_low, margin_high]",
    )
    # NoDecode: the variable is comma-separated (`fmn:200,fab-top3`), as the service's lists are.
    attacks: Annotated[tuple[tuple[str, int], ...], NoDecode] = Field(
        default=(),
        description=f"minimum-norm attack with its step budget (default {DEFAULT_STEPS}), "
        f"repeatable: {attacks_help()}. (default: "
        + "; ".join(f"{_default_plan(norm)} for {norm}" for norm in DEFAULT_ATTACKS)
        + ")",
        json_schema_extra={"flag": "--attack", "metavar": "NAME[:STEPS]"},
    )
    attack_batch_size: int = Field(default=100, ge=1, description="points per attack batch")
    device: str = Field(
        default="auto", description="auto (CUDA when torch sees it), cpu, cuda or cuda:N"
    )
    threshold_rule: ThresholdRuleName = Field(
        default="match-fraction",
        description=(
            "match-fraction: the λ whose flagged fraction equals the subset's "
            "non-robust fraction; target-tpr: smallest λ flagging --target-tpr of the "
            "non-robust points"
        ),
    )
    target_tpr: TargetTpr = Field(default=0.95, description="for --threshold-rule target-tpr")
    estimator: Literal["count", "regression"] = Field(
        default="regression",
        description="robust-accuracy estimate shown as the headline (both are recorded)",
    )
    bootstrap: int = Field(
        default=1000, ge=10, description="bootstrap resamples for confidence intervals"
    )
    pseudo_margin: PseudoMarginMode = Field(
        default="auto",
        description=(
            "auto: learn a pseudo-margin and serve it, guarded by the logit margin, where it "
            "measures better than the free logit margin on the subset (τ, AUROC, estimate "
            "spread, boundary recall; the record says why); always: serve it; never: learn none. "
            f"It needs {MIN_PSEUDO_TRAIN_POINTS} attacked training points (the train split's, "
            "else the split's points outside the subset): with fewer, auto serves the logit "
            "margin (the record says why) and always is refused"
        ),
    )
    pseudo_train_size: int = Field(
        default=1000, ge=10, description="attacked training points for the pseudo-margin"
    )
    pseudo_paths: bool = Field(
        default=True,
        description=(
            "train the pseudo-margin also on points along the training points' attack paths "
            "(x + t(x* - x), t = 0.5, 0.75, 0.9, 1; target (1 - t)·‖x* - x‖), which teaches it "
            "the inputs just before and past a boundary (docs/benchmarks.md, Boundary recall); "
            "the guard then flags below 0.25 of the logit margin's λ instead of 1"
        ),
    )
    pseudo_input: Literal["features", "logits"] = Field(
        default="features", description="what the pseudo-margin MLP reads"
    )
    pseudo_epochs: int = Field(default=500, ge=1, description="pseudo-margin MLP training epochs")
    pseudo_hidden: int = Field(
        default=64,
        ge=1,
        description=(
            "width of the pseudo-margin MLP's hidden layers: its cost on every served request "
            "(docs/benchmarks.md compares 16 to 256 on the shipped model)"
        ),
    )
    pseudo_layers: int = Field(
        default=2,
        ge=0,
        description="hidden layers of the pseudo-margin MLP (0: a linear function of its input)",
    )
    store: Path = Field(
        default_factory=default_store,
        description="artifact store folder (default: $MARGINWATCH_STORE, then ./artifacts)",
    )
    version: str | None = Field(
        default=None,
        description="version name: letters, digits, '.', '_', '-' (default: UTC timestamp)",
    )
    shard: int | None = Field(
        default=None,
        ge=0,
        description="only attack shard I of --num-shards and exit (Kubernetes Indexed Job)",
        json_schema_extra={"metavar": "I"},
    )
    num_shards: int = Field(default=1, ge=1, description="shard count")
    merge_only: bool = Field(
        default=False,
        description="attack nothing: merge finished shards (fail if any is missing)",
        json_schema_extra={"flag": "--merge"},
    )
    quiet: bool = Field(default=False, description="no progress bars")
    preflight_only: bool = Field(
        default=False,
        description=(
            "run the checks that precede any attack (model, data, serving-graph export, store, "
            "lock, version) and exit 0 if they pass"
        ),
    )
    traffic: Path | None = Field(
        default=None,
        description=(
            "check the served version on sampled traffic in this folder (the service's "
            "MARGINWATCH_TRAFFIC_DIR) instead of calibrating: attack a random sample against the "
            "served labels and publish traffic-check.json and a report section beside it, "
            "without changing what is served. Without --model or --name: each model with "
            "traffic here that the store serves, in turn. The served version's dataset, split, "
            "class names, model, normalisation and threat model are reused where no flag gives "
            "them (one line says which)"
        ),
        json_schema_extra={"metavar": "DIR"},
    )
    since: str = Field(
        default="24h",
        description="traffic served since: a duration before now (30m, 24h, 7d) or an ISO time",
        json_schema_extra={"metavar": "WHEN"},
    )
    traffic_size: int = Field(
        default=500, ge=1, description="traffic points to attack (all of them when fewer)"
    )
    refit: bool = Field(
        default=False,
        description=(
            "with --traffic: after the check, publish a new version (fresh labelled subset of "
            "the served version's data unless --dataset is given, verified as usual) whose λ, "
            "and pseudo-margin if one is learned, are fitted on the "
            "traffic points plus the subset; the estimators stay the subset's (they need labels)"
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def _seed_of_version(cls, data: Any) -> Any:
        """Without --seed: the version's seed when --version is given (else the field's default
        draws a fresh one)."""
        if not isinstance(data, dict) or data.get("seed") is not None:
            return data
        version = data.get("version")
        if isinstance(version, str):
            return {**data, "seed": seed_of_version(version)}
        return data

    # The checks of single fields (plain functions in config_parsing), in the order they run.
    _since_readable = field_validator("since")(parsing.since_readable)
    _eps_positive = field_validator("eps")(parsing.eps_positive)
    _split_numbers = field_validator("input_range", "mean", "std", "eps_grid", mode="before")(
        parsing.split_numbers
    )
    _split_names = field_validator("class_names", mode="before")(parsing.split_names)
    _names_distinct = field_validator("class_names")(parsing.names_distinct)
    _version_is_a_name = field_validator("version")(parsing.version_is_a_name)
    _std_positive = field_validator("std")(parsing.std_positive)
    _range_increasing = field_validator("input_range")(parsing.range_increasing)
    _parse_attacks = field_validator("attacks", mode="before")(parsing.parse_attacks)
    _known_device = field_validator("device")(parsing.known_device)

    @model_validator(mode="after")
    def _consistent(self) -> CalibrationConfig:
        parsing.check_consistent(self)
        return self

    @property
    def progress(self) -> bool:
        return not self.quiet

    @property
    def resolved_eps(self) -> float:
        return self.eps if self.eps is not None else DEFAULT_EPS[self.norm]

    @property
    def resolved_eps_grid(self) -> tuple[float, ...]:
        """The budget grid, increasing, the served ε among it (`--eps-grid`, else ε/4 … 2ε)."""
        eps = self.resolved_eps
        grid = self.eps_grid or (eps / 4, eps / 2, eps, 2 * eps)
        return tuple(sorted({*grid, eps}))

    @property
    def resolved_attacks(self) -> tuple[tuple[str, int], ...]:
        return self.attacks or tuple((name, DEFAULT_STEPS) for name in DEFAULT_ATTACKS[self.norm])

    @property
    def attack_plan(self) -> AttackPlan:
        from marginwatch.calibration.margin_cache import AttackPlan

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
    def normalizes(self) -> bool:
        """Whether the model expects inputs other than [0, 1] (then `Normalized` wraps it)."""
        return (self.input_range, self.mean, self.std) != ((0.0, 1.0), (0.0,), (1.0,))

    @property
    def torch_device(self) -> torch.device:
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)
