"""Input margins d(x) = min ‖δ‖ s.t. argmax f(x + δ) ≠ argmax f(x), measured as the per-sample
minimum over several minimum-norm attacks (Ngnawé et al., "Detecting Brittle Decisions for
Free: Leveraging Margin Consistency in Deep Robust Classifiers", NeurIPS 2024).

Margins are label-free: `labels` are the model's own predictions (`predicted_labels`), as in the
paper. An attack's output counts only where a fresh forward pass confirms the label changed and
the point lies in [0, 1]; the radius is never read off ‖adv − x‖ alone.

Censoring: where every attack failed, `success` is False and `radius` is +∞ (never 0), so the
point ranks as the most robust; whether a point is non-robust at ε is decided in one place,
`metrics.nonrobust_mask(radius, success, eps)`. `censored_at` holds, for every sample, the
largest norm the attacks can reach inside the box, ‖max(x, 1 − x)‖ (each attack clips its
search radius there); a consumer that needs a finite value for a censored point (say, a
regression on √d) takes `MarginResult.finite_radius` and keeps the point flagged as censored.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
import torch

from marginwatch.calibration.attacks._common import (
    KNOWN_NORMS,
    Model,
    check_inputs,
    check_norm,
    perturbation_norm,
    worst_norm,
)
from marginwatch.calibration.progress import Advance, phase

__all__ = ["MarginResult", "attack_name", "input_margins", "perturbation_norm", "predicted_labels"]


def _frozen(array: np.ndarray) -> np.ndarray:
    array = np.array(array, copy=True)
    array.flags.writeable = False
    return array


@dataclass(frozen=True)
class MarginResult:
    """Per-sample input margins in one norm (arrays are read-only copies).

    radius: float64, min over attacks of the confirmed adversarial norm; +∞ where censored.
    success: bool, False where every attack failed (censored).
    per_attack: attack name → float64 radius, +∞ where that attack failed.
    censored_at: float64, the largest norm reachable in the box (lower-bound stand-in for
        censored points; see the module docstring).
    norm: the norm the radii are measured in.
    adv_inputs: float32, per sample the confirmed adversarial input of the smallest radius (the
        clean input where every attack failed), or None where not kept (results older than
        margin-cache format 2; joined results of which one part has none).
    """

    radius: np.ndarray
    success: np.ndarray
    per_attack: Mapping[str, np.ndarray]
    censored_at: np.ndarray
    norm: float
    adv_inputs: np.ndarray | None = None
    attack_names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        size = len(self.radius)
        arrays = [self.success, self.censored_at, *self.per_attack.values()]
        if any(array.shape != (size,) for array in arrays):
            raise ValueError("every MarginResult array must have one entry per sample")
        if self.adv_inputs is not None and len(self.adv_inputs) != size:
            raise ValueError("adv_inputs must hold one input per sample")
        if np.any(np.isnan(self.radius)) or np.any(self.radius < 0):
            raise ValueError("radii must be non-negative numbers")
        if np.any(np.isfinite(self.radius) != self.success):
            raise ValueError("success must hold exactly where the radius is finite")
        object.__setattr__(self, "radius", _frozen(self.radius.astype(np.float64)))
        object.__setattr__(self, "success", _frozen(self.success.astype(bool)))
        object.__setattr__(self, "censored_at", _frozen(self.censored_at.astype(np.float64)))
        frozen = {name: _frozen(r.astype(np.float64)) for name, r in self.per_attack.items()}
        object.__setattr__(self, "per_attack", MappingProxyType(frozen))
        object.__setattr__(self, "attack_names", tuple(frozen))
        if self.adv_inputs is not None:
            object.__setattr__(self, "adv_inputs", _frozen(self.adv_inputs.astype(np.float32)))

    @property
    def censored(self) -> np.ndarray:
        """True where every attack failed."""
        return ~self.success

    @property
    def finite_radius(self) -> np.ndarray:
        """`radius`, with `censored_at` (a lower bound) where every attack failed."""
        return np.where(self.success, self.radius, self.censored_at)


def attack_name(attack: Callable[..., torch.Tensor]) -> str:
    """A readable name for an attack function or a `functools.partial` of one."""
    while isinstance(attack, functools.partial):
        attack = attack.func
    return getattr(attack, "__name__", type(attack).__name__)


def _unique_names(attacks: Sequence[Callable[..., torch.Tensor]]) -> list[str]:
    names: list[str] = []
    for attack in attacks:
        base = attack_name(attack)
        name, index = base, 2
        while name in names:
            name, index = f"{base}#{index}", index + 1
        names.append(name)
    return names


@torch.no_grad()
def predicted_labels(model: Model, inputs: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """argmax of the model's logits, computed in batches, on the inputs' device."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    parts = [model(inputs[start : start + batch_size]).argmax(dim=1)
             for start in range(0, len(inputs), batch_size)]  # fmt: skip
    if not parts:
        return torch.zeros(0, dtype=torch.long, device=inputs.device)
    return torch.cat(parts)


@torch.no_grad()
def confirmed_radius(
    model: Model,
    inputs: torch.Tensor,
    adv_inputs: torch.Tensor,
    labels: torch.Tensor,
    norm: float,
) -> torch.Tensor:
    """‖adv − x‖ in float64 where a forward pass confirms the label changed and adv lies in
    [0, 1] with the shape of x; +∞ elsewhere (a failed or invalid attack)."""
    if adv_inputs.shape != inputs.shape:
        raise ValueError(
            f"attack returned shape {tuple(adv_inputs.shape)} for inputs {tuple(inputs.shape)}"
        )
    flat = adv_inputs.flatten(1)
    in_box = ((flat >= 0) & (flat <= 1)).all(dim=1)
    flipped = model(adv_inputs).argmax(dim=1) != labels
    radius = perturbation_norm(adv_inputs.double() - inputs.double(), norm)
    return torch.where(flipped & in_box, radius, torch.full_like(radius, math.inf))


def input_margins(
    model: Model,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    norm: float,
    attacks: Sequence[Callable[..., torch.Tensor]],
    batch_size: int = 64,
    progress: bool = True,
    advance: Advance | None = None,
) -> MarginResult:
    """Per-sample minimum over `attacks` of the confirmed adversarial norm.

    Each attack is called as `attack(model, x, y, norm=norm)` on batches of `batch_size`; bind
    other options with `functools.partial`. `labels` should be `predicted_labels(model, inputs)`
    (a sample whose label the model already disagrees with gets radius 0). The model must be in
    eval mode; this function never changes its mode.

    Progress counts points, each once every attack is done with its batch: with `progress`, on
    a bar of its own; with `advance`, on the caller's (a bar spanning several calls, say the
    margin cache's chunks), and no bar here.
    """
    check_norm(norm, KNOWN_NORMS, "input_margins")
    check_inputs(inputs, labels)
    if not attacks:
        raise ValueError("input_margins needs at least one attack")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if isinstance(model, torch.nn.Module) and model.training:
        raise ValueError("the model must be in eval mode (call model.eval())")
    named = dict(zip(_unique_names(attacks), attacks, strict=True))
    radii: dict[str, list[torch.Tensor]] = {name: [] for name in named}
    best_inputs: list[torch.Tensor] = []
    with phase("input margins", len(inputs), enabled=progress and advance is None) as own:
        for start in range(0, len(inputs), batch_size):
            part = slice(start, start + batch_size)
            best = _attack_batch(
                model, inputs[part], labels[part], norm=norm, attacks=named, radii=radii
            )
            best_inputs.append(best)
            (advance or own)(len(best))
    per_attack = {name: _to_numpy(parts) for name, parts in radii.items()}
    radius = np.min(np.stack(list(per_attack.values())), axis=0)
    return MarginResult(
        radius=radius,
        success=np.isfinite(radius),
        per_attack=per_attack,
        censored_at=worst_norm(inputs.double(), norm).cpu().numpy(),
        norm=float(norm),
        adv_inputs=torch.cat(best_inputs).numpy() if best_inputs else inputs.float().cpu().numpy(),
    )


def _attack_batch(
    model: Model,
    batch: torch.Tensor,
    labels: torch.Tensor,
    *,
    norm: float,
    attacks: Mapping[str, Callable[..., torch.Tensor]],
    radii: dict[str, list[torch.Tensor]],
) -> torch.Tensor:
    """Run every attack on one batch, appending each one's confirmed radii to `radii`; returns
    the closest confirmed adversarial input per point (on the CPU)."""
    # the clean input stands where every attack fails; `success` says which those are
    best = batch.detach().float().clone()
    best_radius = torch.full((len(batch),), math.inf, dtype=torch.float64, device=batch.device)
    for name, attack in attacks.items():
        adv = attack(model, batch, labels, norm=norm).detach()
        radius = confirmed_radius(model, batch, adv, labels, norm)
        radii[name].append(radius)
        closer = radius < best_radius
        best[closer] = adv[closer].float()
        best_radius = torch.minimum(best_radius, radius)
    return best.cpu()


def _to_numpy(parts: list[torch.Tensor]) -> np.ndarray:
    if not parts:
        return np.zeros(0, dtype=np.float64)
    return torch.cat(parts).cpu().numpy().astype(np.float64)
