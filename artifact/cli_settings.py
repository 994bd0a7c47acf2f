"""Command-line options written from a pydantic model, for every marginwatch command
(`marginwatch-serve`, `marginwatch-calibrate`, `marginwatch-train`, `marginwatch-export`).

One flag per field, written from the field itself, so that a command line cannot drift from its
settings: `--max-batch-size` for `max_batch_size` (or the spelling `json_schema_extra={"flag":
...}` keeps), the description as help followed by the environment variable and the default,
choices for a `Literal` (or `json_schema_extra={"choices": ...}`), `--x/--no-x` for a switch,
and for a list or tuple a flag that may be repeated or take comma-separated values. Values stay
strings: pydantic converts and checks a flag's value exactly as it does the variable's, and a
repeated flag's values reach it comma-joined, as the variable writes them.

A flag that is not given leaves no value (`argparse.SUPPRESS`), so pydantic-settings applies the
variable, then the default: **a flag beats the variable, which beats the default.** A plain
`BaseModel` (no variables) gets the same flags; its fields without a default are required.

Here, not in a command's package, because the service may import neither the models nor the
job: a leaf of the contract every part already imports (pydantic only, no torch).
"""

from __future__ import annotations

import argparse
import typing
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

METAVARS: dict[object, str] = {int: "N", float: "NUMBER", str: "TEXT", Path: "PATH"}


def _extra(field: FieldInfo) -> dict[str, Any]:
    return field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}


def option_flag(name: str, field: FieldInfo) -> str:
    """The field's flag: its name with dashes, unless it keeps another spelling."""
    return str(_extra(field).get("flag", "--" + name.replace("_", "-")))


def variable(model: type[BaseModel], name: str) -> str | None:
    """The environment variable that sets field `name` (None for a model without variables)."""
    if not issubclass(model, BaseSettings):
        return None
    return f"{model.model_config.get('env_prefix', '')}{name.upper()}"


def source(model: type[BaseModel], name: str, given: Collection[str]) -> str:
    """Where field `name`'s value came from, for an error message: the flag if it was given,
    else the variable."""
    field = model.model_fields[name]
    if name in given or variable(model, name) is None:
        return option_flag(name, field)
    return str(variable(model, name))


def shown(value: object) -> str:
    """A default as a flag takes it: a list comma-separated (`0,1`), None as `unset`."""
    if isinstance(value, list | tuple):
        parts = [f"{item:g}" if isinstance(item, float) else str(item) for item in value]
        return ",".join(parts) or "none"
    return "unset" if value is None else str(value)


def _repeated(field: FieldInfo) -> bool:
    return typing.get_origin(field.annotation) in (list, tuple)


def _metavar(field: FieldInfo) -> str:
    if _repeated(field):
        return "A,B"
    # an optional value (`Path | None`) is named by its type
    kinds = [kind for kind in typing.get_args(field.annotation) if kind is not type(None)]
    kind = kinds[0] if len(kinds) == 1 else field.annotation
    return METAVARS.get(kind, "VALUE")


def help_text(model: type[BaseModel], name: str) -> str:
    """The description, then the variable and the default. A description that states its
    default in words (`(default: fresh each run)`) gets no value written after it."""
    field = model.model_fields[name]
    text = field.description or ""
    notes = [note for note in [variable(model, name)] if note]
    if "(default" not in text and not field.is_required():
        notes.append(f"default: {shown(field.get_default(call_default_factory=True))}")
    if notes:
        text += f" ({'; '.join(notes)})"
    return text.replace("%", "%%")  # argparse %-formats help texts


def _keywords(model: type[BaseModel], name: str) -> dict[str, Any]:
    """add_argument's keywords for field `name`, all but its flag."""
    field = model.model_fields[name]
    keywords: dict[str, Any] = {"help": help_text(model, name), "default": argparse.SUPPRESS}
    extra = _extra(field)
    if field.annotation is bool:
        return keywords | {"action": argparse.BooleanOptionalAction}
    choices = extra.get("choices")
    if typing.get_origin(field.annotation) is typing.Literal:
        choices = [str(value) for value in typing.get_args(field.annotation)]
    if choices is None:
        keywords["metavar"] = extra.get("metavar", _metavar(field))
    if _repeated(field):
        keywords["action"] = "append"
    if field.is_required() and variable(model, name) is None and not extra.get("positional"):
        keywords["required"] = True
    return keywords | {"choices": choices}


def add_options(
    parser: argparse.ArgumentParser,
    model: type[BaseModel],
    groups: Mapping[str, str] | None = None,
) -> dict[str, argparse._ArgumentGroup]:
    """One option per field of `model`, in field order; `groups` starts a `--help` section
    (the value, its title) at each field it names. Returns the sections by title, for a
    command's own options."""
    sections: dict[str, argparse._ArgumentGroup] = {}
    container: argparse._ActionsContainer = parser
    for name, field in model.model_fields.items():
        if groups and name in groups:
            container = sections[groups[name]] = parser.add_argument_group(groups[name])
        keywords = _keywords(model, name)
        if _extra(field).get("positional"):
            keywords.pop("default")  # a positional argument is always given
            container.add_argument(name, **keywords)
        else:
            container.add_argument(option_flag(name, field), dest=name, **keywords)
    return sections


def given_values(arguments: argparse.Namespace, model: type[BaseModel]) -> dict[str, Any]:
    """The fields given on the command line, as keyword arguments for `model`: a repeated
    flag's values comma-joined (the variable's form); a flag not given is absent, so that the
    variable, then the default, applies."""
    values = {key: value for key, value in vars(arguments).items() if key in model.model_fields}
    return {
        key: ",".join(value) if isinstance(value, list) else value for key, value in values.items()
    }


def problems(
    error: ValidationError, model: type[BaseModel], given: Iterable[str], *, quote: bool = True
) -> list[str]:
    """pydantic's findings, one sentence each, naming the flag or variable the value came from
    (`source`); the value is quoted unless `quote` is False, for settings that hold secrets."""
    given = set(given)
    found = []
    for problem in error.errors(include_url=False):
        if problem["type"] == "value_error":
            message = str(problem.get("ctx", {}).get("error"))  # the validator's own sentence
        else:
            message = f"{problem['msg'][:1].lower()}{problem['msg'][1:]}"
            message += f", got {problem['input']!r}" if quote else ""
        name = str(problem["loc"][0]) if problem["loc"] else ""
        if name in model.model_fields:
            message = f"{source(model, name, given)}: {message}"
        found.append(message)
    return found
