"""`marginwatch-train`: train a classifier with a recipe and write weights plus a model card."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from marginwatch.artifact.hashing import file_sha256
from marginwatch.models.architectures import ARCHITECTURES
from marginwatch.models.cli import add_dataset_options, command_parser
from marginwatch.models.data import DataError, load_dataset, stratified_indices
from marginwatch.models.registry import save_weights
from marginwatch.models.training import RECIPES, Recipe, evaluate, model_card, train

PROG = "marginwatch-train"
DESCRIPTION = (
    "Train a classifier on a dataset with a recipe; write <out>.safetensors (weights) and "
    "<out>.json (model card with clean and PGD-20 robust accuracy)."
)


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser(PROG, DESCRIPTION)
    parser.add_argument(
        "--arch", choices=sorted(ARCHITECTURES), default="fmnist-cnn", help="architecture to train"
    )
    parser.add_argument(
        "--recipe",
        choices=RECIPES,
        default="pgd",
        help="standard: cross-entropy; pgd: l-inf PGD adversarial training; "
        "sovr: PGD training with the SOVR loss (Kanai et al., ICML 2023)",
    )
    add_dataset_options(parser, default="fashion-mnist", role="training and test data")
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="output path without suffix: writes OUT.safetensors and OUT.json",
    )
    parser.add_argument("--name", default=None, help="model name in the card (default: OUT's name)")
    parser.add_argument("--epochs", type=int, default=8, help="training epochs")
    parser.add_argument("--batch-size", type=int, default=128, help="training batch size")
    parser.add_argument(
        "--lr", type=float, default=1e-3, help="peak Adam learning rate (one-cycle schedule)"
    )
    parser.add_argument(
        "--eps",
        type=float,
        default=0.1,
        help="l-inf budget for adversarial training and for the PGD-20 evaluation",
    )
    parser.add_argument(
        "--attack-steps", type=int, default=7, help="PGD steps per training batch (pgd, sovr)"
    )
    parser.add_argument(
        "--sovr-fraction",
        type=float,
        default=0.4,
        help="fraction of each batch (smallest logit margins) trained with the "
        "one-vs-the-rest loss (sovr)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for initialisation, order, attacks"
    )
    parser.add_argument(
        "--train-limit",
        type=int,
        default=None,
        help="train on a stratified subset of this many images (smoke runs)",
    )
    parser.add_argument(
        "--eval-limit",
        type=int,
        default=None,
        help="evaluate on a stratified subset of this many test images "
        "(default: the full test split)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        recipe = Recipe(
            args.recipe,
            args.epochs,
            args.batch_size,
            args.lr,
            args.eps,
            args.attack_steps,
            args.sovr_fraction,
        )
        train_data = load_dataset(args.dataset, "train", args.data_dir)
        test_data = load_dataset(args.dataset, "test", args.data_dir)
        if args.train_limit:
            train_data = train_data.subset(
                stratified_indices(train_data.labels, args.train_limit, args.seed)
            )
        if args.eval_limit:
            test_data = test_data.subset(
                stratified_indices(test_data.labels, args.eval_limit, args.seed)
            )
    except (ValueError, DataError) as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    model = ARCHITECTURES[args.arch]()
    started = time.monotonic()
    train(model, train_data, recipe, seed=args.seed, progress=not args.quiet)
    seconds = time.monotonic() - started
    evaluation = evaluate(model, test_data, eps=args.eps, seed=args.seed, progress=not args.quiet)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    weights = args.out.with_suffix(".safetensors")
    save_weights(model, weights)
    card = model_card(
        model_name=args.name or args.out.name,
        architecture=args.arch,
        recipe=recipe,
        seed=args.seed,
        train_data=f"{args.dataset}:train",
        train_samples=len(train_data),
        evaluation=evaluation,
        eval_data=f"{args.dataset}:test",
        weights_sha256=file_sha256(weights),
        seconds=seconds,
    )
    args.out.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    print(
        f"{card['name']}: clean accuracy {evaluation.clean_accuracy:.4f}, "
        f"PGD-20 robust accuracy {evaluation.robust_accuracy:.4f} at eps={args.eps} "
        f"on {evaluation.samples} test images; wrote {weights} and {args.out.with_suffix('.json')}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
