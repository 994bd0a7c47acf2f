"""What `marginwatch-calibrate --traffic DIR` checks, and with which settings.

Without `--model` or `--name`, the models found in DIR: each model folder that holds traffic
and has a served version in the store, checked in turn. For each, the served version's setup,
which the check and `--refit` reuse unless a flag (or its variable) gives the setting: the data
source and split, the class names, the model and its weights, the model's input normalisation,
and the threat model. A refit on the default dataset instead of the served version's would
publish other class names for the same labels, silently; a check with another normalisation
would attack another function than the one served.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from marginwatch.artifact import store
from marginwatch.artifact.cli_settings import option_flag
from marginwatch.artifact.schema import CalibrationRecord, ThreatModel
from marginwatch.artifact.traffic import traffic_models
from marginwatch.calibration.config import CalibrationConfig, ConfigError
from marginwatch.models.data import DATASETS
from marginwatch.models.registry import MODEL_FILE_SUFFIXES, SHIPPED_MODELS

# Settings reused together, and the settings whose flag keeps them the user's instead: weights
# belong to their model, a data folder to its dataset, and class names to the data they name
# (other data keeps its own names; a refit that names the classes otherwise is reported).
REUSED: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("dataset", "data_dir"), ("dataset", "data_dir")),
    (("split",), ("split",)),
    (("class_names",), ("class_names", "dataset")),
    (("model", "weights"), ("model", "weights")),
    (("input_range",), ("input_range",)),
    (("mean",), ("mean",)),
    (("std",), ("std",)),
    (("eps_grid",), ("eps_grid",)),
    (("margin_interval",), ("margin_interval",)),
)


def _flag(name: str) -> str:
    """The command line's flag of config field `name` (`cli_settings` writes the parser)."""
    return option_flag(name, CalibrationConfig.model_fields[name])


def _listed(names: Sequence[str]) -> str:
    return ", ".join(names) if names else "none"


def served_version(config: CalibrationConfig) -> tuple[Path, CalibrationRecord]:
    """The folder and verified record of the version CURRENT names; `ConfigError` if none."""
    name = config.resolved_model_name
    if store.current_version(config.store, name) is None:
        raise ConfigError(
            f"no served version of {name!r} in {config.store} to check; it serves: "
            f"{_listed(store.list_models(config.store))}"
        )
    folder = store.current_dir(config.store, name)
    return folder, store.read_record(folder)


def models_to_check(
    config: CalibrationConfig, notify: Callable[[str], None], *, as_json: bool = False
) -> list[CalibrationConfig]:
    """`config` itself when `--model` or `--name` names the model; else one config per model
    of the traffic folder that the store serves (`notify` hears of the others)."""
    given = config.model_fields_set
    root = config.traffic
    if root is None or {"model", "model_name"} & given:
        return [config]
    if not root.is_dir():
        raise ConfigError(f"traffic folder {root} does not exist")
    found = traffic_models(root)
    served = store.list_models(config.store)
    names = [name for name in found if name in served]
    if not found:
        folders = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name[0] != ".")
        raise ConfigError(
            f"no models in {root}: no folder there holds a traffic shard (folders: "
            f"{_listed(folders)}); is sampling on in the service (MARGINWATCH_TRAFFIC_DIR)?"
        )
    if not names:
        raise ConfigError(
            f"no traffic in {root} of a model served from {config.store}: found traffic of: "
            f"{_listed(found)}; the store serves: {_listed(served)} (give --store)"
        )
    if as_json and len(names) > 1:
        raise ConfigError(
            f"--json prints one check, but {root} holds traffic of {len(names)} served models "
            f"({_listed(names)}): give --name to pick one"
        )
    for name in sorted(set(found) - set(names)):
        notify(f"traffic of {name!r} is not checked: no served version in {config.store}")
    return [config.model_copy(update={"model_name": name}) for name in names]


def served_setup(record: CalibrationRecord) -> dict[str, Any]:
    """The served version's settings, by config field, as far as its record holds them."""
    setup: dict[str, Any] = {
        "dataset": record.subset.dataset,
        "data_dir": record.subset.data_dir,
        "split": record.subset.split,
        "class_names": tuple(record.class_names),
    }
    source = record.model_source
    if source is not None:
        setup |= {
            "model": source.model,
            "weights": source.weights,
            "input_range": source.input_range,
            "mean": source.mean,
            "std": source.std,
        }
    elif record.model_name in SHIPPED_MODELS:
        setup["model"] = record.model_name  # an older record: a shipped model is its name
    if record.budgets is not None:  # a refit answers for the same budgets
        setup["eps_grid"] = tuple(budget.eps for budget in record.budgets)
    if record.margin_quantiles is not None:
        setup["margin_interval"] = record.margin_quantiles.interval
    return setup


def _check_threat_model(config: CalibrationConfig, threat: ThreatModel) -> None:
    """`--norm`/`--eps`, when given, must be the served ones: a check in another threat model
    would check nothing the flag claims."""
    given = config.model_fields_set
    if ("norm" in given and config.norm != threat.norm) or (
        "eps" in given and config.resolved_eps != threat.eps
    ):
        raise ConfigError(
            f"the served version flags for {threat.norm} ε = {threat.eps:g}; the check measures "
            f"in the same threat model: drop --norm and --eps, or give those"
        )


def _refuse_missing_paths(reused: dict[str, Any]) -> None:
    """A reused path that is not there from here (a relative one, run from elsewhere) is named
    with the flag that replaces it, before anything loads."""
    paths = [(name, reused.get(name)) for name in ("dataset", "data_dir", "weights", "model")]
    for name, value in paths:
        if value is None or (name == "dataset" and value in DATASETS):
            continue
        if name == "model" and Path(value).suffix not in MODEL_FILE_SUFFIXES:
            continue  # a shipped model, an architecture or module:factory: not a file
        if not Path(value).exists():
            raise ConfigError(
                f"the served version was calibrated with {_flag(name)} {value}, which does not "
                f"exist from this working folder: give {_flag(name)}"
            )


def with_served_setup(
    config: CalibrationConfig, record: CalibrationRecord
) -> tuple[CalibrationConfig, str]:
    """`config` with every setting of the served version that no flag gives, and a line that
    says what was reused. Always the served threat model (`--norm`/`--eps` may only repeat it)."""
    _check_threat_model(config, record.threat_model)
    given = config.model_fields_set
    setup = served_setup(record)
    if not {"model", "weights"} & given and "model" not in setup:
        raise ConfigError(
            f"the served version {record.version} of {record.model_name!r} does not record its "
            "model (it predates that field): give --model (and --weights)"
        )
    reused = {
        name: setup[name]
        for group, keepers in REUSED
        if not set(keepers) & given
        for name in group
        if name in setup
    }
    _refuse_missing_paths(reused)
    threat = {"norm": record.threat_model.norm, "eps": record.threat_model.eps}
    # validated again: the configured attacks must support the served norm
    updated = CalibrationConfig.model_validate({**config.model_dump(), **reused, **threat})
    # What the user gave stays "given", and nothing more: the defaults they left alone keep
    # behaving as defaults (a default --subset-size still shrinks to small data).
    object.__setattr__(updated, "__pydantic_fields_set__", given | set(reused) | set(threat))
    return updated, reuse_note(record, reused, given)


def names_text(names: Sequence[str]) -> str:
    """Class names for a message: all of a few, the ends of many, and their count."""
    shown = ", ".join(names) if len(names) <= 5 else f"{', '.join(names[:3])}, …, {names[-1]}"
    return f"{shown} ({len(names)})"


def _numbers(values: Sequence[float]) -> str:
    return ",".join(f"{value:g}" for value in values)


def reuse_note(record: CalibrationRecord, reused: dict[str, Any], given: set[str]) -> str:
    """One line: what the check (and the refit) took from the served version, and the flags
    that kept the user's settings instead."""
    parts = []
    if "dataset" in reused:
        folder = reused.get("data_dir")
        parts.append(f"dataset {reused['dataset']}" + (f" ({folder})" if folder else ""))
    if "split" in reused:
        parts.append(f"split {reused['split']}")
    if "class_names" in reused:
        parts.append(f"class names {names_text(reused['class_names'])}")
    if "model" in reused:
        weights = reused.get("weights")
        parts.append(f"model {reused['model']}" + (f" (weights {weights})" if weights else ""))
    for name, label in (("input_range", "input range"), ("mean", "mean"), ("std", "std")):
        if name in reused:
            parts.append(f"{label} {_numbers(reused[name])}")
    threat = record.threat_model
    parts.append(f"threat model {threat.norm} ε = {threat.eps:g}")
    if "eps_grid" in reused:
        parts.append(f"budget grid {_numbers(reused['eps_grid'])}")
    if "margin_interval" in reused:
        parts.append(f"margin interval {reused['margin_interval']:g}")
    kept = [_flag(name) for group, _ in REUSED for name in group if name in given]
    note = f"{record.model_name}: reusing served version {record.version}'s " + ", ".join(parts)
    return note + (f"; given instead: {', '.join(kept)}" if kept else "")
