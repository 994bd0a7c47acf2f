"""The score choice (issue 10): the guarded pseudo-margin in the exported graph, the points just
past a boundary that measure it, and the decision by measured benefit."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from marginwatch.artifact.flags import guarded_score_np
from marginwatch.artifact.schema import PseudoMarginFacts, ScoreChoice, ScoreFigures
from marginwatch.calibration.boundary_points import first_flip, path_points
from marginwatch.calibration.config import CalibrationConfig, PseudoMarginMode
from marginwatch.calibration.inputs import forward_all
from marginwatch.calibration.margins import MarginResult
from marginwatch.calibration.score_choice import (
    GUARD_SHARE,
    GUARD_SHARE_WITHOUT_PATHS,
    TrainingSet,
    choose,
    decide,
    guard_scale,
)
from marginwatch.calibration.scores import (
    PseudoMarginHead,
    ServingGraph,
    export_serving_graph,
    logit_margin,
)
from marginwatch.calibration.threshold import threshold_matching_fraction
from marginwatch.models.architectures import FashionMnistCNN
from marginwatch.models.data import load_dataset
from marginwatch.models.registry import load_model


class TwoClassLinear(torch.nn.Module):
    """logits (z, −z) with z = w·x − c: the ℓ∞ distance to the boundary is |z| / ‖w‖₁."""

    def __init__(self, size: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.w = torch.randn(size, generator=generator)
        self.c = float(self.w.sum() / 2)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        z = inputs.flatten(1) @ self.w - self.c
        return torch.stack([z, -z], dim=1)


def test_guarded_graph_is_the_minimum_and_exports_exactly() -> None:
    torch.manual_seed(0)
    model = FashionMnistCNN().eval()
    head = PseudoMarginHead(model.feature_dim).eval()
    graph = ServingGraph(model, head, "features", guard_scale=0.3).eval()
    inputs = torch.rand(64, 1, 28, 28)
    with torch.no_grad():
        logits, score = graph(inputs)
        pseudo = head(model.features(inputs))
        expected = torch.minimum(pseudo, 0.3 * logit_margin(logits))
    torch.testing.assert_close(score, expected)
    # what score_choice measures outside the graph (artifact.flags) is what the graph serves
    served = guarded_score_np(pseudo.numpy(), logit_margin(logits).numpy(), 0.3)
    np.testing.assert_array_equal(served, score.numpy())
    labels, onnx_scores, band = export_serving_graph(graph, (1, 28, 28), inputs.numpy(), None)
    np.testing.assert_allclose(onnx_scores, expected.numpy(), atol=1e-4)
    assert (labels == logits.argmax(1).numpy()).all() and band <= 1e-4


@pytest.mark.parametrize("scale", [0.0, -1.0])
def test_guard_scale_must_be_positive_and_needs_a_head(scale: float) -> None:
    model = FashionMnistCNN()
    with pytest.raises(ValueError, match="guard scale"):
        ServingGraph(model, PseudoMarginHead(model.feature_dim), guard_scale=scale)
    with pytest.raises(ValueError, match="guard scale"):
        ServingGraph(model, guard_scale=1.0)


@pytest.mark.parametrize("step", [0.002, 0.01])
def test_first_flip_stops_within_one_step_past_the_boundary(step: float) -> None:
    model = TwoClassLinear(16)
    inputs = torch.rand(40, 1, 4, 4)
    labels = model(inputs).argmax(1)
    points, flipped = first_flip(model, inputs, labels, norm=math.inf, step=step, max_steps=400)
    assert flipped.float().mean() > 0.9
    z = model(points[flipped])[:, 0]
    assert (model(points[flipped]).argmax(1) != labels[flipped]).all()
    # past the boundary by at most one step in ℓ∞ (a sign step moves z by at most step·‖w‖₁)
    assert (z.abs() / model.w.abs().sum() <= step + 1e-6).all()


def test_first_flip_leaves_points_that_cannot_flip_unflipped() -> None:
    model = TwoClassLinear(16)
    inputs = torch.rand(10, 1, 4, 4)
    labels = model(inputs).argmax(1)
    _, flipped = first_flip(model, inputs, labels, norm=2.0, step=1e-4, max_steps=2)
    distance = model(inputs)[:, 0].abs() / model.w.norm()
    assert not flipped[distance > 3e-4].any()


def test_path_points_lie_the_given_distance_before_the_adversarial_point() -> None:
    inputs = torch.zeros(3, 1, 2, 2)
    adversarial = torch.full((3, 1, 2, 2), 0.5) * torch.tensor([1.0, 0.2, 0.06]).view(3, 1, 1, 1)
    radius = torch.tensor([0.5, 0.1, 0.03])
    points, sources = path_points(inputs, adversarial, radius, [0.05, 0.02])
    assert sources.tolist() == [0, 1, 0, 1, 2]
    distance = (adversarial[sources] - points).flatten(1).abs().amax(1)
    torch.testing.assert_close(distance, torch.tensor([0.05, 0.05, 0.02, 0.02, 0.02]))


def test_guard_scale_matches_each_score_at_its_own_threshold() -> None:
    rng = np.random.default_rng(0)
    pseudo, logit = rng.random(200), 3 * rng.random(200)
    nonrobust = rng.random(200) < 0.3
    kappa = guard_scale(pseudo, logit, nonrobust, threshold_matching_fraction)
    threshold_pseudo = threshold_matching_fraction(pseudo, nonrobust)
    threshold_logit = threshold_matching_fraction(logit, nonrobust)
    assert kappa * GUARD_SHARE * threshold_logit == pytest.approx(threshold_pseudo)
    assert guard_scale(pseudo, logit, nonrobust, threshold_matching_fraction, share=1.0) * (
        threshold_logit
    ) == pytest.approx(threshold_pseudo)
    # without a non-robust point the λs are no scale: the medians set it, still positive
    assert guard_scale(-pseudo, logit, np.zeros(200, bool), threshold_matching_fraction) > 0


def figures(name: str, **changes: float | None) -> ScoreFigures:
    values = {"kendall_tau": 0.55, "auroc": 0.93, "threshold": 0.5, "estimate": 0.7,
              "estimate_spread": 0.02, "boundary_recall": 1.0, "boundary_points": 50,
              "multiply_adds": 0} | changes  # fmt: skip
    return ScoreFigures.model_validate({"name": name, **values})


@pytest.mark.parametrize(
    ("learned", "forced", "chosen", "words"),
    [
        ({"auroc": 0.95}, False, "guarded", "AUROC 0.930 → 0.950"),
        ({"kendall_tau": 0.7}, False, "guarded", "τ 0.550 → 0.700"),
        ({"estimate_spread": 0.015}, False, "guarded", "interval 2.00 → 1.50 points wide"),
        ({"auroc": 0.932}, False, "logit-margin", "no gain above noise"),
        ({"auroc": 0.96, "boundary_recall": 0.88}, False, "logit-margin", "boundary recall"),
        ({}, True, "guarded", "forced"),
    ],
)
def test_the_learned_score_is_served_only_for_a_measured_gain(
    learned: dict[str, float], forced: bool, chosen: str, words: str
) -> None:
    logit = figures("logit-margin")
    choice = decide(logit, figures("guarded", multiply_adds=12_000, **learned), forced=forced)
    assert choice.chosen == chosen and words in choice.reason
    assert "12,000 multiply-adds" in choice.reason
    assert [c.name for c in choice.candidates] == ["logit-margin", "guarded"]


def test_choice_round_trips_inside_the_facts() -> None:
    choice = decide(figures("logit-margin"), figures("guarded", auroc=0.96), forced=False)
    facts = PseudoMarginFacts(
        score_input="features", hidden=64, layers=2, train_points=10, held_out_points=5,
        logit_margin_tau=0.5, logit_margin_auroc=0.9, pseudo_margin_tau=0.7,
        pseudo_margin_auroc=0.95, chosen=True, guard_scale=0.2, choice=choice,
    )  # fmt: skip
    again = PseudoMarginFacts.model_validate_json(facts.model_dump_json())
    assert again == facts and isinstance(again.choice, ScoreChoice)


def stand_in_margins(margins: np.ndarray) -> MarginResult:
    return MarginResult(radius=margins, success=np.ones(margins.size, bool),
                        per_attack={"fmn": margins}, censored_at=np.ones(margins.size),
                        norm=math.inf)  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["always", "auto"])
def test_choose_records_both_candidates_and_serves_what_it_chose(
    mode: PseudoMarginMode, tmp_path: Path, seeded_one_thread: None
) -> None:
    model = load_model("fmnist-cnn-pgd").eval()
    data = load_dataset("fashion-mnist-subset", "test")
    images, labels = data.float_images[:300], data.labels[:300]
    outputs = forward_all(model, images, torch.device("cpu"))
    # stand-in margins, a noisy function of the logit margin (the attacks are tested elsewhere)
    rng = np.random.default_rng(0)
    margins = np.clip(0.05 * outputs.scores + rng.normal(0, 0.02, 300), 0.001, None)
    config = CalibrationConfig(store=tmp_path, seed=0, pseudo_margin=mode, pseudo_epochs=30,
                               bootstrap=20, quiet=True)  # fmt: skip
    subset = np.arange(150)
    graph, facts = choose(
        config, model, training=TrainingSet(outputs.features[150:], margins[150:]),
        images=images, labels=labels, subset=subset, margins=stand_in_margins(margins[subset]),
    )  # fmt: skip
    assert facts.choice is not None and facts.guard_scale is not None and facts.guard_scale > 0
    logit, learned = facts.choice.candidates
    assert (logit.name, learned.name) == ("logit-margin", "guarded-pseudo-margin")
    assert logit.boundary_points is not None and logit.boundary_points > 0
    assert logit.boundary_recall is not None and learned.multiply_adds > logit.multiply_adds == 0
    assert facts.chosen == (facts.choice.chosen == learned.name)
    assert facts.chosen or mode == "auto"
    # clean training points only: the guard's share is the one measured best without paths
    assert (facts.path_points, facts.guard_share) == (0, GUARD_SHARE_WITHOUT_PATHS)
    with torch.no_grad():
        served_logits, served = graph(torch.from_numpy(images[:50]))
    if facts.chosen:
        assert graph.guard_scale == facts.guard_scale
        assert torch.all(served <= facts.guard_scale * logit_margin(served_logits) + 1e-6)
    else:
        torch.testing.assert_close(served, logit_margin(served_logits))
