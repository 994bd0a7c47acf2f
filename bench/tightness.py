"""Tightness of our input margins against a reference implementation (not part of the tests).

    .venv/bin/pip install foolbox==3.3.4      # for this benchmark only
    .venv/bin/python bench/tightness.py --points 200

On the same points of the shipped test subset, against the model's predicted labels, compares
the per-sample radius of each of our attacks and of the job's ensemble (minimum over FMN and
FAB-top3) with foolbox's ℓ∞ FMN (`LInfFMNAttack`, 100 steps). Prints the median and quantiles
of ours / reference (≤ 1.00 means ours is at least as tight), success rates and ms per image.
Radii are checked the same way for both: a fresh forward pass must confirm the flip.
"""

from __future__ import annotations

import argparse
import functools
import math
import time

import numpy as np
import torch

from marginwatch.calibration.attacks import ATTACKS
from marginwatch.calibration.margins import confirmed_radius, input_margins, predicted_labels
from marginwatch.models.data import load_dataset, stratified_indices
from marginwatch.models.registry import load_model


def foolbox_fmn(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor, steps: int):  # type: ignore[no-untyped-def]
    import foolbox

    wrapped = foolbox.PyTorchModel(model, bounds=(0, 1))
    attack = foolbox.attacks.LInfFMNAttack(steps=steps)
    adversarial = []
    for start in range(0, len(inputs), 50):
        _, clipped, _ = attack(
            wrapped, inputs[start : start + 50], labels[start : start + 50], epsilons=None
        )
        adversarial.append(clipped)
    return torch.cat(adversarial)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fmnist-cnn-pgd")
    parser.add_argument("--points", type=int, default=200)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    model = load_model(args.model)
    data = load_dataset("fashion-mnist-subset", "test")
    data = data.subset(stratified_indices(data.labels, args.points, seed=0))
    inputs = torch.from_numpy(data.float_images)
    labels = predicted_labels(model, inputs)
    started = time.monotonic()
    reference = foolbox_fmn(model, inputs, labels, args.steps)
    reference_ms = 1000 * (time.monotonic() - started) / len(inputs)
    reference_radius = confirmed_radius(model, inputs, reference, labels, math.inf).numpy()
    print(f"foolbox LInfFMN: {reference_ms:.0f} ms/image, "
          f"success {np.isfinite(reference_radius).mean():.3f}")  # fmt: skip
    ours = {}
    for name in ("fmn", "fab-top3", "fab"):
        started = time.monotonic()
        result = input_margins(
            model, inputs, labels, norm=math.inf, progress=False, batch_size=100,
            attacks=[functools.partial(ATTACKS[name], steps=args.steps)],
        )  # fmt: skip
        ms = 1000 * (time.monotonic() - started) / len(inputs)
        ours[name] = result.radius
        print(f"{name:9s}: {ms:.0f} ms/image, success {result.success.mean():.3f}")
    ours["ensemble fmn+fab-top3"] = np.minimum(ours["fmn"], ours["fab-top3"])
    both = np.isfinite(reference_radius)
    for name, radius in ours.items():
        ratio = radius[both] / reference_radius[both]
        q10, q50, q90 = np.quantile(ratio, [0.1, 0.5, 0.9])
        print(f"{name:22s} ours/foolbox: median {q50:.4f}  p10 {q10:.4f}  p90 {q90:.4f}  "
              f"smaller on {np.mean(ratio < 1 - 1e-6):.2%}")  # fmt: skip


if __name__ == "__main__":
    main()
