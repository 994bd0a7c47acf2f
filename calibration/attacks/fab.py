"""Fast Adaptive Boundary attack, untargeted (Croce & Hein, "Minimally distorted Adversarial
Examples with a Fast Adaptive Boundary Attack", ICML 2020, arXiv:1907.02044) — the attack the
margin-consistency paper (Ngnawé et al., NeurIPS 2024) uses to measure input margins.

Written after the algorithm in the paper and the reference code (fra31/auto-attack,
jeromerony/adversarial-library). The projection onto a hyperplane inside the [0, 1] box is
solved exactly by sorting the points where coordinates saturate (a piecewise-linear root)
rather than by the reference's iterative scheme. Random restarts are left out (the paper's
margins use one deterministic run); a final bisection along each best perturbation
(`binary_search_steps`, 0 to skip) removes the η overshoot.
"""

from __future__ import annotations

import math

import torch

from marginwatch.calibration.attacks import _common


def project_onto_hyperplane(
    weights: torch.Tensor,
    target: torch.Tensor,
    lower: torch.Tensor,
    upper: torch.Tensor,
    norm: float,
) -> torch.Tensor:
    """Per row, the ℓp-smallest δ with weights·δ = target and lower ≤ δ ≤ upper (lower ≤ 0 ≤
    upper). Where the box cannot reach the hyperplane, the box corner nearest to it.

    The minimiser is δ(t) = clip(t·d, lower, upper) with d = sign(w) for ℓ∞ and d = w for ℓ2
    (KKT), and w·δ(t) is piecewise linear and increasing in t: sort the breakpoints where
    coordinates saturate and solve on the segment that reaches the target. Rows are 2-D
    (N×D); the arithmetic is float64 so tiny weights cannot overflow the breakpoints.
    """
    dtype = weights.dtype
    weights, target = weights.double(), target.double()
    lower, upper = lower.double(), upper.double()
    flip = torch.where(target < 0, -1.0, 1.0).to(weights)
    weights, target = weights * flip.unsqueeze(1), (target * flip).unsqueeze(1)
    direction = weights.sign() if norm == math.inf else weights
    room = torch.where(direction > 0, upper, -lower)
    speed = direction.abs()
    breaks = torch.where(speed > 0, room / speed.clamp_min(1e-300), 0.0)
    breaks, order = breaks.sort(dim=1)
    saturated = (weights.abs() * room).gather(1, order)
    slope = (weights.abs() * speed).gather(1, order)
    cum_saturated = saturated.cumsum(1)
    free_slope = slope.sum(1, keepdim=True) - slope.cumsum(1)
    hit = cum_saturated + breaks * free_slope >= target
    segment = hit.int().argmax(dim=1, keepdim=True)
    before = cum_saturated.gather(1, segment) - saturated.gather(1, segment)
    rate = free_slope.gather(1, segment) + slope.gather(1, segment)
    scale = (target - before) / rate.clamp_min(1e-300)
    scale = torch.where(hit.any(dim=1, keepdim=True), scale, breaks[:, -1:])
    return torch.minimum(torch.maximum(scale * direction, lower), upper).to(dtype)


def _class_differences(
    model: _common.Model, points: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """z_k − z_label at `points` for each candidate class k (N×m) and its input gradient
    (N×m×D), by one forward/backward pass on m copies of the batch."""
    size, count = classes.shape
    copies = points.repeat_interleave(count, dim=0).requires_grad_(True)
    logits = model(copies)
    own = labels.repeat_interleave(count).unsqueeze(1)
    differences = (logits.gather(1, classes.reshape(-1, 1)) - logits.gather(1, own)).squeeze(1)
    (gradients,) = torch.autograd.grad(differences.sum(), copies)
    return differences.detach().view(size, count), gradients.view(size, count, -1)


def _candidate_classes(
    logits: torch.Tensor, labels: torch.Tensor, count: int | None
) -> torch.Tensor:
    """The classes other than the label, all of them or the `count` highest-scoring ones."""
    num_classes = logits.shape[1]
    masked = logits.scatter(1, labels.unsqueeze(1), -math.inf)
    keep = num_classes - 1 if count is None else max(1, min(count, num_classes - 1))
    return masked.topk(keep, dim=1).indices


def fab(
    model: _common.Model,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    norm: float,
    steps: int = 100,
    alpha_max: float = 0.1,
    eta: float = 1.05,
    beta: float = 0.9,
    candidates: int | None = None,
    binary_search_steps: int = 20,
) -> torch.Tensor:
    """Untargeted FAB (Croce & Hein, ICML 2020) in ℓ2 or ℓ∞.

    Each step linearises every candidate class boundary at the current point, takes the
    nearest (in the chosen norm), projects both the current point and the original input onto
    it inside the box, and moves to a biased combination of the two projections (weight at
    most `alpha_max` on the original, overshoot `eta`); an adversarial iterate is pulled back
    towards the input by `beta`. `candidates` limits the classes linearised to the top ones
    at the input (each costs a forward/backward pass per step); None uses all of them.

    Returns the smallest adversarial iterate per sample, refined by bisection along its ray,
    or the original input where the attack failed — callers must re-check the label.
    """
    _common.check_call("fab", norm, inputs, labels)
    with torch.no_grad():
        logits = model(inputs)
    if logits.shape[1] < 2:
        raise ValueError("fab needs a model with at least two classes")
    classes = _candidate_classes(logits, labels, candidates)
    best_adv = _fab_loop(
        model, inputs, labels, classes, norm=float(norm), steps=steps,
        alpha_max=alpha_max, eta=eta, beta=beta,
    )  # fmt: skip
    if binary_search_steps > 0:
        best_adv = _common.boundary_search(
            model, inputs, best_adv, labels, steps=binary_search_steps
        )
    already = _common.is_adversarial(logits, labels)
    return torch.where(_common.batch_view(already, inputs), inputs, best_adv)


def _fab_loop(
    model: _common.Model,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    classes: torch.Tensor,
    *,
    norm: float,
    steps: int,
    alpha_max: float,
    eta: float,
    beta: float,
) -> torch.Tensor:
    origin = inputs.flatten(1)
    point = origin.clone()
    best_norm = torch.full((len(inputs),), math.inf, device=inputs.device, dtype=inputs.dtype)
    best = origin.clone()
    rows = torch.arange(len(inputs), device=inputs.device)
    for _ in range(steps):
        with torch.enable_grad():
            differences, gradients = _class_differences(
                model, point.view_as(inputs), labels, classes
            )
        with torch.no_grad():
            dual = torch.linalg.vector_norm(gradients, ord=_common.DUAL_NORMS[norm], dim=2)
            pick = (differences.abs() / dual.clamp_min(1e-12)).argmin(dim=1)
            weights, value = gradients[rows, pick], differences[rows, pick]
            offset = (weights * (origin - point)).sum(dim=1)
            step_here = project_onto_hyperplane(weights, -value, -point, 1 - point, norm)
            step_origin = project_onto_hyperplane(
                weights, -value - offset, -origin, 1 - origin, norm
            )
            here = _common.perturbation_norm(step_here, norm)
            there = _common.perturbation_norm(step_origin, norm)
            alpha = (here / (here + there).clamp_min(1e-12)).clamp(0, alpha_max).unsqueeze(1)
            point = (point + eta * step_here) * (1 - alpha) + (origin + eta * step_origin) * alpha
            point = point.clamp(0, 1)
            adversarial = _common.is_adversarial(model(point.view_as(inputs)), labels)
            distance = _common.perturbation_norm(point - origin, norm)
            improved = adversarial & (distance < best_norm)
            best_norm = torch.where(improved, distance, best_norm)
            best = torch.where(improved.unsqueeze(1), point, best)
            point = torch.where(adversarial.unsqueeze(1), origin + beta * (point - origin), point)
    return best.view_as(inputs)
