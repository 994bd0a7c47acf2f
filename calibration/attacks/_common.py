"""Helpers shared by the minimum-norm attacks: argument checks (the norms an attack supports are
its line in `calibration/attack_registry.py`), perturbation norms, the logit-difference loss and
a boundary search along a ray. Every function here is a pure function on tensors."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection

import torch

from marginwatch.calibration.attack_registry import attack_spec

Model = Callable[[torch.Tensor], torch.Tensor]

KNOWN_NORMS: tuple[float, ...] = (1.0, 2.0, math.inf)

# The dual q (1/p + 1/q = 1) of each norm p that fmn and fab attack in: a linear function with
# gradient w changes by at most ‖w‖_q per unit of ℓp distance, so |f(x)| / ‖w‖_q is the ℓp
# distance from x to its zero set.
DUAL_NORMS: dict[float, float] = {2.0: 2.0, math.inf: 1.0}


def check_norm(norm: float, supported: Collection[float], attack: str) -> None:
    """Raise `ValueError` unless `norm` is one of `supported` (2 and 2.0 are the same norm)."""
    if not any(norm == allowed for allowed in supported):
        allowed_text = ", ".join(str(value) for value in supported)
        raise ValueError(f"{attack} supports the norms {allowed_text}; got {norm!r}")


def check_inputs(inputs: torch.Tensor, labels: torch.Tensor) -> None:
    """Raise `ValueError` for inputs outside [0, 1] (NaN included) or mismatched labels."""
    if not torch.is_floating_point(inputs):
        raise ValueError(f"inputs must be a floating-point tensor, got {inputs.dtype}")
    if inputs.ndim < 2:
        raise ValueError(f"inputs must be batched (N×...), got shape {tuple(inputs.shape)}")
    if not bool(torch.all((inputs >= 0) & (inputs <= 1))):
        raise ValueError("input values must lie in [0, 1]")
    if labels.shape != inputs.shape[:1]:
        raise ValueError(f"labels must have shape ({len(inputs)},), got {tuple(labels.shape)}")


def check_call(attack: str, norm: float, inputs: torch.Tensor, labels: torch.Tensor) -> None:
    """The checks every attack makes before it starts: `norm` is one that `attack` supports
    (its line in `calibration/attack_registry.py`), and `inputs` and `labels` pass
    `check_inputs`."""
    check_norm(norm, attack_spec(attack).norm_values, attack)
    check_inputs(inputs, labels)


def perturbation_norm(delta: torch.Tensor, norm: float) -> torch.Tensor:
    """Per-sample norm of a batch of perturbations: ℓ∞ is the max |δ| over all non-batch
    dimensions, ℓ2 and ℓ1 are taken on the flattened sample. Returns shape (N,)."""
    check_norm(norm, KNOWN_NORMS, "perturbation_norm")
    flat = delta.flatten(1)
    if norm == math.inf:
        return flat.abs().amax(dim=1) if flat.shape[1] else flat.new_zeros(len(flat))
    return torch.linalg.vector_norm(flat, ord=norm, dim=1)


def worst_norm(inputs: torch.Tensor, norm: float) -> torch.Tensor:
    """The largest perturbation norm that keeps each input inside the [0, 1] box."""
    return perturbation_norm(torch.maximum(inputs, 1 - inputs), norm)


def batch_view(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape per-sample values (N,) to broadcast against `like` (N×...)."""
    return values.view(-1, *[1] * (like.ndim - 1))


def difference_of_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """z_label − max_{k≠label} z_k: positive while the label is still predicted."""
    label_logits = logits.gather(1, labels.unsqueeze(1)).squeeze(1)
    others = logits.scatter(1, labels.unsqueeze(1), -math.inf)
    return label_logits - others.amax(dim=1)


def is_adversarial(
    logits: torch.Tensor, labels: torch.Tensor, *, targeted: bool = False
) -> torch.Tensor:
    """Untargeted: the prediction left `labels`; targeted: it reached them."""
    predicted = logits.argmax(dim=1)
    return predicted == labels if targeted else predicted != labels


@torch.no_grad()
def boundary_search(
    model: Model,
    inputs: torch.Tensor,
    adv_inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int,
    targeted: bool = False,
) -> torch.Tensor:
    """Shrink each adversarial perturbation along its own ray by bisection on its scale.

    Every norm scales linearly along the ray, so this can only lower the norm. A row moves only
    to a probe that was checked adversarial, and each such probe is smaller than the last, so an
    adversarial row stays adversarial; a row where no probe is adversarial is returned unchanged.
    """
    delta = adv_inputs - inputs
    best = adv_inputs.clone()
    lower = torch.zeros(len(inputs), device=inputs.device, dtype=inputs.dtype)
    upper = torch.ones_like(lower)
    for _ in range(steps):
        middle = (lower + upper) / 2
        probe = inputs + batch_view(middle, inputs) * delta
        adversarial = is_adversarial(model(probe), labels, targeted=targeted)
        upper = torch.where(adversarial, middle, upper)
        lower = torch.where(adversarial, lower, middle)
        best = torch.where(batch_view(adversarial, inputs), probe, best)
    return best
