"""Fast Minimum-Norm attack (Pintor, Roli, Brendel, Biggio, "Fast Minimum-norm Adversarial
Attacks through Adaptive Norm Constraints", NeurIPS 2021, arXiv:2102.12827).

Ported from jeromerony/adversarial-library, `adv_lib/attacks/fast_minimum_norm.py`
(BSD-3-Clause, © Jérôme Rony), itself adapted from maurapintor/Fast-Minimum-Norm-FMN-Attack.
Departures from that code: the ℓ2 step projects onto the ε-ball (scale by min(1, ε/‖δ‖))
where adv_lib rescales onto the ε-sphere; the warm-start search keeps its last *adversarial*
probe; the best norm starts at +∞ so that no adversarial is dropped; before the first
adversarial the radius never shrinks and overshoots the linearised boundary distance by
(1 + γ) (see `_update_epsilon`); ℓ0 and ℓ1 are left out.
"""

from __future__ import annotations

import math

import torch

from marginwatch.calibration.attacks import _common


def _project(delta: torch.Tensor, epsilon: torch.Tensor, norm: float) -> torch.Tensor:
    """Euclidean projection of each perturbation onto its ℓp ball of radius ε."""
    flat = delta.flatten(1)
    radius = epsilon.unsqueeze(1)
    if norm == math.inf:
        return torch.minimum(torch.maximum(flat, -radius), radius).view_as(delta)
    lengths = flat.norm(p=2, dim=1, keepdim=True).clamp_min(1e-12)
    return (flat * (radius / lengths).clamp(max=1)).view_as(delta)


def _mid_points(
    inputs: torch.Tensor, targets: torch.Tensor, fraction: torch.Tensor, norm: float
) -> torch.Tensor:
    """Points between inputs (fraction 0) and targets (fraction 1), as in adv_lib: ℓ2 is the
    straight segment, ℓ∞ clips the difference to a box of half-width `fraction`."""
    if norm == math.inf:
        return inputs + _project(targets - inputs, fraction, norm)
    fraction = _common.batch_view(fraction, inputs)
    return inputs * (1 - fraction) + targets * fraction


@torch.no_grad()
def _warm_start(
    model: _common.Model,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    starting_points: torch.Tensor,
    *,
    norm: float,
    targeted: bool,
    steps: int,
) -> torch.Tensor:
    """Bisect between inputs and adversarial starting points; return the starting perturbation."""
    if starting_points.shape != inputs.shape:
        raise ValueError("starting_points must have the shape of inputs")
    if not bool(_common.is_adversarial(model(starting_points), labels, targeted=targeted).all()):
        raise ValueError("starting_points are not all adversarial")
    lower = torch.zeros(len(inputs), device=inputs.device, dtype=inputs.dtype)
    upper = torch.ones_like(lower)
    for _ in range(steps):
        middle = (lower + upper) / 2
        probe = _mid_points(inputs, starting_points, middle, norm)
        adversarial = _common.is_adversarial(model(probe), labels, targeted=targeted)
        lower = torch.where(adversarial, lower, middle)
        upper = torch.where(adversarial, middle, upper)
    return _mid_points(inputs, starting_points, upper, norm) - inputs


def _update_epsilon(
    epsilon: torch.Tensor,
    *,
    adversarial: torch.Tensor,
    found: torch.Tensor,
    best_norm: torch.Tensor,
    delta_norm: torch.Tensor,
    to_boundary: torch.Tensor,
    gamma: float,
) -> torch.Tensor:
    """FMN's adaptive radius: shrink by (1 − γ) when adversarial, grow by (1 + γ) when not.
    Before the first adversarial FMN jumps to the linearised distance to the boundary; here the
    radius takes the larger of that estimate and its previous value, times (1 + γ). FMN's own
    rule can stall for good: on a linear model the estimate is exact and the iterates land on
    the boundary without crossing it, and where the box clips the step (dark pixels pushed
    darker) the estimate stays too small — 3 of 16 Fashion-MNIST images never became
    adversarial in ℓ2 with it."""
    estimate = delta_norm + to_boundary
    estimate = torch.where(torch.isfinite(epsilon), torch.maximum(estimate, epsilon), estimate)
    grown = torch.where(found, epsilon * (1 + gamma), estimate * (1 + gamma))
    return torch.where(adversarial, torch.minimum(epsilon * (1 - gamma), best_norm), grown)


def fmn(
    model: _common.Model,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    norm: float,
    steps: int = 100,
    targeted: bool = False,
    alpha_init: float = 1.0,
    alpha_final: float | None = None,
    gamma_init: float = 0.05,
    gamma_final: float = 0.001,
    starting_points: torch.Tensor | None = None,
    binary_search_steps: int = 10,
) -> torch.Tensor:
    """Fast Minimum-Norm attack (Pintor et al., NeurIPS 2021) in ℓ2 or ℓ∞.

    Gradient steps on the logit difference, of size α (cosine-annealed from `alpha_init` to
    `alpha_final`, default α_init/100), each followed by a projection onto an ℓp ball whose
    radius ε shrinks by a factor (1 − γ) after an adversarial iterate and grows by (1 + γ)
    otherwise (γ annealed from `gamma_init` to `gamma_final`). `labels` are the labels to move
    away from (untargeted) or towards (`targeted`). `starting_points`, if given, must be
    adversarial; the attack then starts from the boundary point found by `binary_search_steps`
    bisections between them and the inputs.

    Returns the smallest adversarial iterate per sample, or the original input where the
    attack failed — callers must re-check the label.
    """
    _common.check_call("fmn", norm, inputs, labels)
    alpha_final = alpha_init / 100 if alpha_final is None else alpha_final
    if starting_points is None:
        delta = torch.zeros_like(inputs)
    else:
        delta = _warm_start(
            model, inputs, labels, starting_points,
            norm=norm, targeted=targeted, steps=binary_search_steps,
        )  # fmt: skip
    with torch.enable_grad():
        return _fmn_loop(
            model, inputs, labels, delta, norm=norm, steps=steps, targeted=targeted,
            alphas=(alpha_init, alpha_final), gammas=(gamma_init, gamma_final),
        )  # fmt: skip


def _fmn_loop(
    model: _common.Model,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    delta: torch.Tensor,
    *,
    norm: float,
    steps: int,
    targeted: bool,
    alphas: tuple[float, float],
    gammas: tuple[float, float],
) -> torch.Tensor:
    size = len(inputs)
    limit = _common.worst_norm(inputs, norm)
    epsilon = torch.full((size,), math.inf, device=inputs.device, dtype=inputs.dtype)
    best_norm = torch.full_like(epsilon, math.inf)
    best_adv = inputs.clone()
    found = torch.zeros(size, dtype=torch.bool, device=inputs.device)
    sign = 1.0 if targeted else -1.0
    for step in range(steps):
        cosine = (1 + math.cos(math.pi * step / steps)) / 2
        alpha = alphas[1] + (alphas[0] - alphas[1]) * cosine
        gamma = gammas[1] + (gammas[0] - gammas[1]) * cosine
        delta = delta.detach().requires_grad_(True)
        adv_inputs = inputs + delta
        logits = model(adv_inputs)
        loss = sign * _common.difference_of_logits(logits, labels)
        (gradient,) = torch.autograd.grad(loss.sum(), delta)
        with torch.no_grad():
            delta_norm = _common.perturbation_norm(delta, norm)
            adversarial = _common.is_adversarial(logits, labels, targeted=targeted)
            improved = adversarial & (delta_norm < best_norm)
            found |= adversarial
            best_norm = torch.where(improved, delta_norm, best_norm)
            best_adv = torch.where(_common.batch_view(improved, inputs), adv_inputs, best_adv)
            dual_norm = _common.DUAL_NORMS[float(norm)]
            dual = _common.perturbation_norm(gradient, dual_norm).clamp_min(1e-12)
            epsilon = _update_epsilon(
                epsilon, adversarial=adversarial, found=found, best_norm=best_norm,
                delta_norm=delta_norm, to_boundary=loss.abs() / dual, gamma=gamma,
            )  # fmt: skip
            epsilon = torch.minimum(epsilon, limit)
            lengths = gradient.flatten(1).norm(p=2, dim=1).clamp_min(1e-12)
            delta = delta + alpha * gradient / _common.batch_view(lengths, inputs)
            delta = _project(delta, epsilon, norm)
            delta = (inputs + delta).clamp(0, 1) - inputs
    return best_adv.detach()
