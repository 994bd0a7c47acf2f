"""Inputs that sit just past, or just before, a decision boundary: what a flag must catch.

A point just past the boundary (a minimal adversarial perturbation, or drift toward a class
border) has an input margin near 0 by construction, so a flag worth its name catches nearly all
of them. Two free sources, used by `bench/boundary_recall.py` and by the calibration's choice of
score (`score_choice`):

* `first_flip`: a fixed-step attack (sign-gradient steps in ℓ∞, normalised-gradient steps in
  ℓ2, no projection onto a ball) stopped at the first step that flips the label; the flipped
  point lies within one step of the boundary.
* `path_points`: points x + t(x* − x) on the segment to an adversarial point x* at distance r
  from x*; their margin is at most r (x* is r away and flips), exactly r when x* is minimal.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from marginwatch.calibration.attacks._common import Model, batch_view, check_inputs, check_norm

__all__ = ["first_flip", "path_points"]


def _step_direction(gradient: torch.Tensor, norm: float) -> torch.Tensor:
    if norm == math.inf:
        return gradient.sign()
    length = gradient.flatten(1).norm(dim=1).clamp_min(1e-12)
    return gradient / batch_view(length, gradient)


def first_flip(
    model: Model,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    norm: float,
    step: float,
    max_steps: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ascend the cross-entropy of `labels` by steps of norm `step` (clipped to [0, 1]) and stop
    each point at its first flip. Returns the points (the flipped one, or the last step) and a
    mask of the points that flipped within `max_steps`."""
    check_norm(norm, (2.0, math.inf), "first_flip")
    check_inputs(inputs, labels)
    if not step > 0 or max_steps < 1:
        raise ValueError(f"need step > 0 and max_steps >= 1, got {step} and {max_steps}")
    current = inputs.detach().clone()
    flipped = torch.zeros(len(inputs), dtype=torch.bool, device=inputs.device)
    for _ in range(max_steps):
        active = (~flipped).nonzero().squeeze(1)
        if active.numel() == 0:
            break
        points = current[active].requires_grad_(True)
        loss = F.cross_entropy(model(points), labels[active], reduction="sum")
        (gradient,) = torch.autograd.grad(loss, points)
        moved = (points.detach() + step * _step_direction(gradient, norm)).clamp(0, 1)
        current[active] = moved
        with torch.no_grad():
            flipped[active] = model(moved).argmax(1) != labels[active]
    return current, flipped


def path_points(
    inputs: torch.Tensor,
    adversarial: torch.Tensor,
    radius: torch.Tensor,
    distances: Sequence[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each distance r and each point with radius > r (‖x* − x‖ in the attack's norm), the
    point on the segment from x to x* that lies r away from x*. Returns the points and the index
    of the input each came from."""
    chosen, sources = [], []
    for distance in distances:
        keep = (radius > distance).nonzero().squeeze(1)
        fraction = 1.0 - distance / radius[keep]
        start, end = inputs[keep], adversarial[keep]
        chosen.append(start + batch_view(fraction, start).to(start.dtype) * (end - start))
        sources.append(keep)
    return torch.cat(chosen), torch.cat(sources)
