"""Per-image cost of the minimum-norm attacks on the Fashion-MNIST CNN (not part of the tests).

    .venv/bin/python bench/attack_cost.py [--norm inf] [--batch 64] [--steps 100] [--threads 2]

Uses the shipped `fmnist-cnn-pgd` weights and the shipped test subset when they exist, random
weights and random inputs otherwise (timings hold either way; the radii only mean something
with real weights). Prints, per attack: ms per image, success rate and median radius.
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

import numpy as np
import torch

from marginwatch.calibration.attacks import attacks_for_norm, parse_norm
from marginwatch.calibration.margins import input_margins, predicted_labels
from marginwatch.models.architectures import FashionMnistCNN

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "models" / "weights" / "fmnist-cnn-pgd.safetensors"
SUBSET = ROOT / "models" / "datasets" / "fashion-mnist-test-subset.npz"


def load_model() -> tuple[torch.nn.Module, str]:
    if WEIGHTS.exists():
        from marginwatch.models.registry import load_model as load_registered

        return load_registered("fmnist-cnn-pgd"), "fmnist-cnn-pgd"
    torch.manual_seed(0)
    return FashionMnistCNN().eval(), "fmnist-cnn (random weights)"


def load_inputs(batch: int) -> tuple[torch.Tensor, str]:
    if SUBSET.exists():
        from marginwatch.models.data import load_dataset

        images = load_dataset("fashion-mnist-subset", "test").float_images[:batch]
        return torch.from_numpy(np.ascontiguousarray(images)), "fashion-mnist subset"
    return torch.rand(batch, 1, 28, 28, generator=torch.Generator().manual_seed(0)), "random"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--norm", default="inf", help="inf or 2")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--fab-candidates", type=int, default=None, help="FAB: classes per step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    norm = parse_norm(args.norm)
    model, model_name = load_model()
    inputs, data_name = load_inputs(args.batch)
    labels = predicted_labels(model, inputs)
    print(f"{model_name} on {len(inputs)} {data_name} images, l{args.norm}, "
          f"{args.steps} steps, {args.threads} threads")  # fmt: skip
    for name, attack in attacks_for_norm(norm).items():
        options: dict[str, object] = {"steps": args.steps}
        if name == "fab":
            options["candidates"] = args.fab_candidates
        bound = functools.partial(attack, **options)
        start = time.perf_counter()
        result = input_margins(
            model, inputs, labels, norm=norm, attacks=[bound], batch_size=len(inputs),
            progress=False,
        )  # fmt: skip
        elapsed = time.perf_counter() - start
        radii = result.radius[result.success]
        median = float(np.median(radii)) if len(radii) else float("nan")
        print(f"{name:>4}: {1000 * elapsed / len(inputs):7.1f} ms/image, "
              f"success {result.success.mean():.0%}, median radius {median:.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
