"""Input margins: the per-sample minimum over attacks, re-checked on the model, with failures
censored (radius +∞, never 0)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

from marginwatch.calibration.attacks import fab, fmn
from marginwatch.calibration.margins import (
    MarginResult,
    attack_name,
    input_margins,
    perturbation_norm,
    predicted_labels,
)

INF = math.inf


pytestmark = pytest.mark.usefixtures("seeded_one_thread")


class Threshold(nn.Module):
    """Two classes: class 1 exactly where x[0] > `at` (so the ℓ∞ and ℓ2 margins are |x[0] − at|
    when the other coordinates do not matter)."""

    def __init__(self, at: float, size: int = 6) -> None:
        super().__init__()
        self.weights = nn.Parameter(torch.zeros(2, size))
        self.bias = nn.Parameter(torch.tensor([0.0, -10.0 * at]))
        with torch.no_grad():
            self.weights[1, 0] = 10.0

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs.flatten(1) @ self.weights.T + self.bias


class Constant(nn.Module):
    """Always class 0, with gradients that vanish."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.ones(len(inputs)), inputs.flatten(1).sum(1) * 0], dim=1)


def shift_first(amount: float, *, every: int = 1) -> Callable[..., torch.Tensor]:
    """A fake attack that adds `amount` to x[0] on every `every`-th sample, returning the other
    samples unchanged (failed)."""

    def attack(
        model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, *, norm: float
    ) -> torch.Tensor:
        adv = inputs.clone()
        adv[::every, 0] += amount
        return adv

    attack.__name__ = f"shift{amount}"
    return attack


def inputs_at(first: list[float], size: int = 6) -> torch.Tensor:
    inputs = torch.full((len(first), size), 0.5)
    inputs[:, 0] = torch.tensor(first)
    return inputs


def test_minimum_over_attacks_and_per_attack_radii() -> None:
    model = Threshold(0.55).eval()
    inputs = inputs_at([0.5, 0.5, 0.52, 0.52])
    labels = predicted_labels(model, inputs)
    assert labels.tolist() == [0, 0, 0, 0]
    far, near, harmless = shift_first(0.2), shift_first(0.06, every=2), shift_first(0.01)
    result = input_margins(
        model, inputs, labels, norm=INF, attacks=[far, near, harmless], progress=False
    )
    np.testing.assert_allclose(result.per_attack["shift0.2"], 0.2, rtol=1e-6)
    np.testing.assert_allclose(result.per_attack["shift0.06"], [0.06, INF, 0.06, INF], rtol=1e-6)
    # A perturbation that does not flip the label is a failure whatever its norm.
    assert np.all(result.per_attack["shift0.01"] == INF)
    np.testing.assert_allclose(result.radius, [0.06, 0.2, 0.06, 0.2], rtol=1e-6)
    assert result.success.all() and result.radius.dtype == np.float64
    stacked = np.stack(list(result.per_attack.values()))
    np.testing.assert_array_equal(result.radius, stacked.min(axis=0))
    assert result.attack_names == ("shift0.2", "shift0.06", "shift0.01")
    # the kept adversarial input is the closest confirmed one, at exactly that radius
    assert result.adv_inputs is not None and result.adv_inputs.dtype == np.float32
    kept = perturbation_norm(torch.tensor(result.adv_inputs).double() - inputs.double(), INF)
    np.testing.assert_allclose(kept.numpy(), result.radius, rtol=1e-5)


def test_censored_points_keep_their_clean_input() -> None:
    model = Threshold(0.55).eval()
    inputs = inputs_at([0.5, 0.52])
    labels = predicted_labels(model, inputs)
    result = input_margins(
        model, inputs, labels, norm=INF, attacks=[shift_first(0.2, every=2)], progress=False
    )
    assert result.success.tolist() == [True, False] and result.adv_inputs is not None
    np.testing.assert_array_equal(result.adv_inputs[1], inputs[1].numpy())
    assert result.adv_inputs[0, 0] == pytest.approx(0.7)


@pytest.mark.parametrize("norm", [INF, 2.0], ids=["linf", "l2"])
@pytest.mark.parametrize(
    "model", [Constant(), Threshold(1.5)], ids=["constant", "boundary-outside-box"]
)
def test_failed_attacks_are_censored_not_zero(model: nn.Module, norm: float) -> None:
    model.eval()
    inputs = inputs_at([0.5, 0.2, 0.9])
    labels = predicted_labels(model, inputs)
    attacks = [functools.partial(fmn, steps=30), functools.partial(fab, steps=10)]
    result = input_margins(model, inputs, labels, norm=norm, attacks=attacks, progress=False)
    assert not result.success.any() and result.censored.all()
    assert np.all(result.radius == INF)
    assert all(np.all(radii == INF) for radii in result.per_attack.values())
    expected = perturbation_norm(torch.maximum(inputs, 1 - inputs).double(), norm).numpy()
    np.testing.assert_allclose(result.censored_at, expected)
    assert np.all(result.censored_at > 0)


def test_attack_that_leaves_the_box_does_not_count() -> None:
    model = Threshold(0.55).eval()
    inputs = inputs_at([0.5, 0.5])
    result = input_margins(
        model, inputs, predicted_labels(model, inputs), norm=INF,
        attacks=[shift_first(0.6)], progress=False,
    )  # fmt: skip
    assert not result.success.any()


def _linear_problem() -> tuple[nn.Module, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    layer = nn.Linear(12, 4)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(4, 12, generator=generator))
        inputs = 0.4 + 0.2 * torch.rand(9, 12, generator=generator)
        layer.bias.copy_(-(inputs @ layer.weight.T).mean(0))
    return layer.eval(), inputs


@pytest.mark.parametrize("norm", [INF, 2.0], ids=["linf", "l2"])
def test_batch_size_does_not_change_margins(norm: float) -> None:
    model, inputs = _linear_problem()
    labels = predicted_labels(model, inputs, batch_size=4)
    torch.testing.assert_close(labels, model(inputs).argmax(1))
    attacks = [functools.partial(fmn, steps=40), functools.partial(fab, steps=20)]
    results = [
        input_margins(model, inputs, labels, norm=norm, attacks=attacks, batch_size=size,
                      progress=False)
        for size in (1, 4, 64)
    ]  # fmt: skip
    for other in results[1:]:
        np.testing.assert_allclose(other.radius, results[0].radius, rtol=1e-5)
        np.testing.assert_array_equal(other.success, results[0].success)
    assert results[0].success.all()
    # The minimum is the tighter attack's wherever they disagree.
    per_attack = results[0].per_attack
    assert set(per_attack) == {"fmn", "fab"}
    np.testing.assert_array_equal(
        results[0].radius, np.minimum(per_attack["fmn"], per_attack["fab"])
    )


def test_duplicate_attack_names_are_kept_apart() -> None:
    model = Threshold(0.55).eval()
    inputs = inputs_at([0.5])
    attacks = [functools.partial(fmn, steps=10), functools.partial(fmn, steps=20)]
    assert attack_name(attacks[0]) == "fmn"
    result = input_margins(
        model, inputs, predicted_labels(model, inputs), norm=INF, attacks=attacks,
        progress=True,
    )  # fmt: skip
    assert result.attack_names == ("fmn", "fmn#2")
    np.testing.assert_allclose(result.radius, [0.05], rtol=1e-3)


def test_result_is_read_only_and_consistent() -> None:
    model = Threshold(0.55).eval()
    inputs = inputs_at([0.5, 0.5])
    result = input_margins(
        model, inputs, predicted_labels(model, inputs), norm=INF,
        attacks=[shift_first(0.1, every=2)], progress=False,
    )  # fmt: skip
    with pytest.raises(ValueError, match="read-only"):
        result.radius[0] = 0.0
    with pytest.raises(TypeError):
        result.per_attack["x"] = result.radius  # type: ignore[index]
    with pytest.raises(ValueError, match="finite"):
        MarginResult(
            radius=np.array([0.0]), success=np.array([False]), per_attack={},
            censored_at=np.array([1.0]), norm=INF,
        )  # fmt: skip


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"inputs": inputs_at([1.5])}, r"\[0, 1\]"),
        ({"inputs": inputs_at([-0.1])}, r"\[0, 1\]"),
        ({"norm": 3.0}, "norm"),
        ({"attacks": []}, "at least one attack"),
        ({"batch_size": 0}, "batch_size"),
        ({"model": Threshold(0.55).train()}, "eval mode"),
    ],
    ids=["above-one", "below-zero", "norm", "no-attack", "batch-size", "training-mode"],
)
def test_bad_arguments_are_refused(change: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {
        "model": Threshold(0.55).eval(),
        "inputs": inputs_at([0.5]),
        "labels": torch.zeros(1, dtype=torch.long),
        "norm": INF,
        "attacks": [fmn],
        "batch_size": 8,
        "progress": False,
    }
    arguments.update(change)
    with pytest.raises(ValueError, match=message):
        input_margins(**arguments)  # type: ignore[arg-type]
