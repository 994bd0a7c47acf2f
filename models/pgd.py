"""ℓ∞ projected gradient descent (Madry et al., ICLR 2018): the fixed-budget attack used for
adversarial training and for the robust accuracy in model cards. Minimum-norm attacks, which
measure margins, live in `marginwatch.calibration.attacks`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def pgd_linf(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    eps: float,
    steps: int,
    step_size: float | None = None,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Maximise cross-entropy within the ℓ∞ ball of radius `eps`, clipped to [0, 1].

    `step_size` defaults to 2.5·eps/steps. Gradients go through `torch.autograd.grad`, so the
    model's parameter gradients are never touched.
    """
    if eps <= 0 or steps <= 0:
        raise ValueError(f"eps and steps must be positive, got eps={eps}, steps={steps}")
    if inputs.min() < 0 or inputs.max() > 1:
        raise ValueError("inputs must lie in [0, 1]")
    alpha = step_size if step_size is not None else 2.5 * eps / steps
    delta = torch.zeros_like(inputs)
    if random_start:
        noise = torch.rand(inputs.shape, generator=generator, device=inputs.device)
        delta = (2 * noise - 1) * eps
        delta = (inputs + delta).clamp(0, 1) - inputs
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model(inputs + delta), labels, reduction="sum")
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + alpha * grad.sign()).clamp(-eps, eps)
        delta = (inputs + delta).clamp(0, 1) - inputs
    return (inputs + delta).detach()
