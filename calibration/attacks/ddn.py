"""Decoupled Direction and Norm attack (Rony, Hafemann, Oliveira, Ben Ayed, Sabourin, Granger,
"Decoupling Direction and Norm for Efficient Gradient-Based L2 Adversarial Attacks and
Defenses", CVPR 2019, arXiv:1811.09600).

Ported from jeromerony/adversarial-library, `adv_lib/attacks/decoupled_direction_norm.py`
(BSD-3-Clause, © Jérôme Rony). Departures: the SGD step is written out (no optimizer object,
no `.grad` on any tensor); quantisation (`levels`) is off by default because margins are
measured on continuous inputs; the cross-entropy is taken in float64, so that its gradient does
not underflow to zero on confident logits (gaps above ~100 in float32); a final bisection along
each best perturbation (`binary_search_steps`, 0 to skip) removes the up-to-γ overshoot of the
fixed norm schedule.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional

from marginwatch.calibration.attacks import _common


def ddn(
    model: _common.Model,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    norm: float = 2.0,
    steps: int = 100,
    targeted: bool = False,
    gamma: float = 0.05,
    init_norm: float = 1.0,
    levels: int | None = None,
    binary_search_steps: int = 20,
) -> torch.Tensor:
    """Decoupled Direction and Norm attack (Rony et al., CVPR 2019), ℓ2 only.

    A normalised gradient step on the cross-entropy (learning rate cosine-annealed from 1 to
    0.01) picks the direction; the norm is set separately to ε, which shrinks by (1 − γ)
    after an adversarial iterate and grows by (1 + γ) otherwise, starting at `init_norm`.
    `levels`, if set, quantises each iterate to that many grey levels.

    Returns the smallest adversarial iterate per sample, refined by bisection along its ray,
    or the original input where the attack failed — callers must re-check the label.
    """
    _common.check_call("ddn", norm, inputs, labels)
    with torch.enable_grad():
        best_adv = _ddn_loop(
            model, inputs, labels, steps=steps, targeted=targeted,
            gamma=gamma, init_norm=init_norm, levels=levels,
        )  # fmt: skip
    if binary_search_steps > 0:
        best_adv = _common.boundary_search(
            model, inputs, best_adv, labels, steps=binary_search_steps, targeted=targeted
        )
    return best_adv


def _ddn_loop(
    model: _common.Model,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int,
    targeted: bool,
    gamma: float,
    init_norm: float,
    levels: int | None,
) -> torch.Tensor:
    size = len(inputs)
    delta = torch.zeros_like(inputs)
    epsilon = torch.full((size,), init_norm, device=inputs.device, dtype=inputs.dtype)
    limit = _common.worst_norm(inputs, 2.0)
    best_norm = torch.full_like(epsilon, math.inf)
    best_adv = inputs.clone()
    sign = 1.0 if targeted else -1.0
    for step in range(steps):
        learning_rate = 0.01 + (1 - 0.01) * (1 + math.cos(math.pi * step / steps)) / 2
        delta = delta.detach().requires_grad_(True)
        adv_inputs = inputs + delta
        logits = model(adv_inputs)
        loss = sign * functional.cross_entropy(logits.double(), labels, reduction="none")
        (gradient,) = torch.autograd.grad(loss.sum(), delta, retain_graph=True)
        gradient = _unsaturated(gradient, logits, labels, delta, sign)
        with torch.no_grad():
            delta_norm = _common.perturbation_norm(delta, 2.0)
            adversarial = _common.is_adversarial(logits, labels, targeted=targeted)
            improved = adversarial & (delta_norm < best_norm)
            best_norm = torch.where(improved, delta_norm, best_norm)
            best_adv = torch.where(_common.batch_view(improved, inputs), adv_inputs, best_adv)
            delta = delta - learning_rate * _unit_direction(gradient)
            factor = torch.where(adversarial, 1 - gamma, 1 + gamma)
            epsilon = torch.minimum(epsilon * factor, limit)
            lengths = _common.perturbation_norm(delta, 2.0).clamp_min(1e-12)
            delta = delta * _common.batch_view(epsilon / lengths, inputs)
            adv_next = (inputs + delta).clamp(0, 1)
            if levels is not None:
                adv_next = (adv_next * (levels - 1)).round() / (levels - 1)
            delta = adv_next - inputs
    return best_adv.detach()


def _unsaturated(
    gradient: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    delta: torch.Tensor,
    sign: float,
) -> torch.Tensor:
    """Where cross-entropy saturates (its float32 gradient underflows to 0 on confident points),
    follow the logit difference instead, which never saturates; it points the same way as the
    cross-entropy's gradient near a two-class boundary."""
    vanished = _common.perturbation_norm(gradient, 2.0) < 1e-12
    if not bool(vanished.any()):
        return gradient
    margin_loss = -sign * _common.difference_of_logits(logits, labels)
    (fallback,) = torch.autograd.grad(margin_loss.sum(), delta)
    return torch.where(_common.batch_view(vanished, gradient), fallback, gradient)


def _unit_direction(gradient: torch.Tensor) -> torch.Tensor:
    """Gradient scaled to unit ℓ2 norm per sample; a random direction where it vanishes."""
    lengths = _common.perturbation_norm(gradient, 2.0)
    vanished = lengths < 1e-12
    if bool(vanished.any()):
        noise = torch.randn_like(gradient)
        gradient = torch.where(_common.batch_view(vanished, gradient), noise, gradient)
        lengths = _common.perturbation_norm(gradient, 2.0)
    return gradient / _common.batch_view(lengths.clamp_min(1e-12), gradient)
