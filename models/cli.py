"""What the models' command lines (`marginwatch-train`, `marginwatch-export`) share: the form of
their parser and the two options that pick a dataset for `data.load_dataset`."""

from __future__ import annotations

import argparse
from pathlib import Path

from marginwatch.models.data import DATASETS


def command_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A parser whose help shows every option's default."""
    return argparse.ArgumentParser(
        prog=prog,
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )


def add_dataset_options(parser: argparse.ArgumentParser, *, default: str, role: str) -> None:
    """`--dataset` (a name or an .npz path, used as `role`) and `--data-dir`."""
    parser.add_argument(
        "--dataset", default=default, help=f"{role}: one of {', '.join(DATASETS)} or an .npz path"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="folder of the dataset files (Fashion-MNIST: defaults to "
        "$MARGINWATCH_FASHION_MNIST_DIR, then Debian's dataset-fashion-mnist)",
    )
