"""`marginwatch-train`: train a classifier with a recipe and write weights plus a model card."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from marginwatch.artifact.hashing import file_sha256
from marginwatch.models.architectures import ARCHITECTURES
from marginwatch.models.cli import command_parser, data_dir_field, dataset_field, parse_options
from marginwatch.models.data import DataError, Dataset, load_dataset, stratified_indices
from marginwatch.models.registry import save_weights
from marginwatch.models.training import Recipe, RecipeName, evaluate, model_card, train

PROG = "marginwatch-train"
DESCRIPTION = (
    "Train a classifier on a dataset with a recipe; write <out>.safetensors (weights) and "
    "<out>.json (model card with clean and PGD-20 robust accuracy)."
)


class TrainOptions(BaseModel):
    """`marginwatch-train`'s options, one flag each (`artifact.cli_settings`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    arch: str = Field(
        default="fmnist-cnn",
        description="architecture to train",
        json_schema_extra={"choices": list(sorted(ARCHITECTURES))},
    )
    recipe: RecipeName = Field(
        default="pgd",
        description="standard: cross-entropy; pgd: l-inf PGD adversarial training; "
        "sovr: PGD training with the SOVR loss (Kanai et al., ICML 2023)",
    )
    dataset: str = dataset_field(default="fashion-mnist", role="training and test data")
    data_dir: Path | None = data_dir_field()
    out: Path = Field(
        description="output path without suffix: writes OUT.safetensors and OUT.json",
        json_schema_extra={"metavar": "OUT"},
    )
    name: str | None = Field(
        default=None, min_length=1, description="model name in the card (default: OUT's name)"
    )
    epochs: int = Field(default=8, ge=1, description="training epochs")
    batch_size: int = Field(default=128, ge=1, description="training batch size")
    lr: float = Field(
        default=1e-3, gt=0, description="peak Adam learning rate (one-cycle schedule)"
    )
    eps: float = Field(
        default=0.1,
        gt=0,
        description="l-inf budget for adversarial training and for the PGD-20 evaluation",
    )
    attack_steps: int = Field(
        default=7, ge=1, description="PGD steps per training batch (pgd, sovr)"
    )
    sovr_fraction: float = Field(
        default=0.4,
        gt=0,
        le=1,
        description="fraction of each batch (smallest logit margins) trained with the "
        "one-vs-the-rest loss (sovr)",
    )
    seed: int = Field(default=0, ge=0, description="seed for initialisation, order, attacks")
    train_limit: int | None = Field(
        default=None,
        ge=1,
        description="train on a stratified subset of this many images (smoke runs)",
    )
    eval_limit: int | None = Field(
        default=None,
        ge=1,
        description="evaluate on a stratified subset of this many test images "
        "(default: the full test split)",
    )
    threads: int | None = Field(default=None, ge=1, description="torch CPU threads")
    quiet: bool = Field(default=False, description="no progress bars")

    @field_validator("arch")
    @classmethod
    def _known_architecture(cls, arch: str) -> str:
        if arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {arch!r}: use {', '.join(ARCHITECTURES)}")
        return arch

    @property
    def training_recipe(self) -> Recipe:
        return Recipe(
            self.recipe, self.epochs, self.batch_size, self.lr, self.eps, self.attack_steps,
            self.sovr_fraction,
        )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    return command_parser(PROG, DESCRIPTION, TrainOptions)


def _limited(data: Dataset, limit: int | None, seed: int) -> Dataset:
    """A stratified subset of `limit` images, or all of `data` without a limit."""
    return data if limit is None else data.subset(stratified_indices(data.labels, limit, seed))


def main(argv: list[str] | None = None) -> int:
    try:
        options = parse_options(TrainOptions, build_parser(), argv)
        recipe = options.training_recipe
        train_data = load_dataset(options.dataset, "train", options.data_dir)
        test_data = load_dataset(options.dataset, "test", options.data_dir)
        train_data = _limited(train_data, options.train_limit, options.seed)
        test_data = _limited(test_data, options.eval_limit, options.seed)
    except (ValueError, DataError) as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 2
    if options.threads:
        torch.set_num_threads(options.threads)
    torch.manual_seed(options.seed)
    model = ARCHITECTURES[options.arch]()
    started = time.monotonic()
    train(model, train_data, recipe, seed=options.seed, progress=not options.quiet)
    seconds = time.monotonic() - started
    evaluation = evaluate(
        model, test_data, eps=options.eps, seed=options.seed, progress=not options.quiet
    )
    options.out.parent.mkdir(parents=True, exist_ok=True)
    weights = options.out.with_suffix(".safetensors")
    save_weights(model, weights)
    card = model_card(
        model_name=options.name or options.out.name,
        architecture=options.arch,
        recipe=recipe,
        seed=options.seed,
        train_data=f"{options.dataset}:train",
        train_samples=len(train_data),
        evaluation=evaluation,
        eval_data=f"{options.dataset}:test",
        weights_sha256=file_sha256(weights),
        seconds=seconds,
    )
    options.out.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    print(
        f"{card['name']}: clean accuracy {evaluation.clean_accuracy:.4f}, "
        f"PGD-20 robust accuracy {evaluation.robust_accuracy:.4f} at eps={options.eps} "
        f"on {evaluation.samples} test images; wrote {weights} and "
        f"{options.out.with_suffix('.json')}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
