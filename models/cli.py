"""What the models' command lines (`marginwatch-train`, `marginwatch-export`) share: reading
their options model from the command line (`artifact.cli_settings` writes one flag per field,
as for the service and the job) and the two fields that pick a dataset for
`data.load_dataset`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, Field, ValidationError

from marginwatch.artifact import cli_settings
from marginwatch.models.data import DATASETS

Options = TypeVar("Options", bound=BaseModel)


class OptionsError(ValueError):
    """A bad option value; the message names the flag, in one line."""


def command_parser(
    prog: str, description: str, options: type[BaseModel]
) -> argparse.ArgumentParser:
    """A parser with one flag per field of `options` (help: description and default)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    cli_settings.add_options(parser, options)
    return parser


def parse_options(
    options: type[Options], parser: argparse.ArgumentParser, argv: Sequence[str] | None
) -> Options:
    """The options from `argv`; a bad value raises `OptionsError`, one line naming its flag."""
    given = cli_settings.given_values(parser.parse_args(argv), options)
    try:
        return options(**given)
    except ValidationError as error:
        raise OptionsError("; ".join(cli_settings.problems(error, options, given))) from None


def dataset_field(*, default: str, role: str) -> Any:
    """The `--dataset` field: a name or an .npz path, used as `role`."""
    return Field(
        default=default,
        min_length=1,
        description=f"{role}: one of {', '.join(DATASETS)} or an .npz path",
    )


def data_dir_field() -> Any:
    """The `--data-dir` field."""
    return Field(
        default=None,
        description="folder of the dataset files (Fashion-MNIST: defaults to "
        "$MARGINWATCH_FASHION_MNIST_DIR, then Debian's dataset-fashion-mnist)",
    )
