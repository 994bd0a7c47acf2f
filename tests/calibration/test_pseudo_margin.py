"""Calibrator contract (scikit-learn's): parameters only in __init__, fit returns self and sets
attributes ending in `_`, predicting before fit raises, fitting twice gives the same model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from marginwatch.calibration.estimators import IsotonicCurve, NotFittedError
from marginwatch.calibration.metrics import kendall_tau
from marginwatch.calibration.pseudo_margin import (
    PATH_STEPS,
    PseudoMarginRegressor,
    path_training_points,
    regression_targets,
)
from marginwatch.calibration.scores import PseudoMarginHead, ServingGraph
from marginwatch.models.architectures import FashionMnistCNN


def synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, 8)).astype(np.float32)
    margins = np.exp(0.5 * features[:, 0] - 0.3 * features[:, 1] ** 2) / 10
    return features, margins


CALIBRATORS = [
    (lambda: PseudoMarginRegressor(epochs=150, seed=3), lambda: synthetic(300, 0)),
    (IsotonicCurve, lambda: (np.linspace(0, 1, 50), np.linspace(0, 1, 50) > 0.4)),
]


@pytest.mark.parametrize(("make", "data"), CALIBRATORS)
def test_calibrator_contract(make, data) -> None:  # type: ignore[no-untyped-def]
    x, y = data()
    calibrator = make()
    assert not [name for name in vars(calibrator) if name.endswith("_")]
    with pytest.raises(NotFittedError):
        calibrator.predict(x)
    assert calibrator.fit(x, y) is calibrator
    assert [name for name in vars(calibrator) if name.endswith("_")]
    first = calibrator.predict(x)
    np.testing.assert_array_equal(make().fit(x, y).predict(x), first)
    np.testing.assert_array_equal(calibrator.fit(x, y).predict(x), first)


def test_pseudo_margin_learns_a_ranking_of_held_out_points() -> None:
    features, margins = synthetic(600, 1)
    regressor = PseudoMarginRegressor(epochs=300).fit(features[:400], margins[:400])
    assert regressor.losses_[-1] < regressor.losses_[0]
    assert regressor.score(features[400:], margins[400:]) > 0.7
    assert kendall_tau(margins[400:], regressor.predict(features[400:])) > 0.7


def test_censored_radius_targets_stay_on_top() -> None:
    targets = regression_targets(np.array([0.04, np.inf, 0.09]))
    np.testing.assert_allclose(targets, [0.2, 0.3, 0.3])


def test_path_points_lie_on_the_segment_with_the_remaining_distance_as_target() -> None:
    images = np.zeros((3, 4), np.float32)
    adv = np.array([[0.2, 0, 0, 0], [0.9, 0.9, 0.9, 0.9], [0, 0, 0.4, 0]], np.float32)
    margins = np.array([0.2, np.inf, 0.4])  # the second point's attacks failed: no path
    points, targets = path_training_points(images, adv, margins)
    assert points.shape == (2 * len(PATH_STEPS), 4) and points.dtype == np.float32
    for block, t in enumerate(PATH_STEPS):
        np.testing.assert_allclose(points[2 * block], [0.2 * t, 0, 0, 0], rtol=1e-6)
        np.testing.assert_allclose(points[2 * block + 1], [0, 0, 0.4 * t, 0], rtol=1e-6)
        np.testing.assert_allclose(
            targets[2 * block : 2 * block + 2], [(1 - t) * 0.2, (1 - t) * 0.4]
        )
    assert targets[-2:].tolist() == [0, 0]  # t = 1: the adversarial points themselves


def test_serving_graph_with_pseudo_margin_uses_the_head() -> None:
    torch.manual_seed(0)
    model = FashionMnistCNN().eval()
    head = PseudoMarginHead(model.feature_dim).eval()
    inputs = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        logits, score = ServingGraph(model, head, "features")(inputs)
        torch.testing.assert_close(score, head(model.features(inputs)))
        torch.testing.assert_close(logits, model(inputs))
        _, from_logits = ServingGraph(model, PseudoMarginHead(10).eval(), "logits")(inputs)
    assert from_logits.shape == (3,)


def test_folding_the_standardization_keeps_the_outputs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import onnx

    from marginwatch.models.export import export_onnx

    torch.manual_seed(0)
    head = PseudoMarginHead(6).eval()
    head.input_mean.copy_(torch.randn(6))
    head.input_std.copy_(torch.rand(6) + 0.5)
    inputs = torch.randn(5, 6)
    with torch.no_grad():
        before = head(inputs)
        head.fold_standardization()
        torch.testing.assert_close(head(inputs), before, rtol=1e-5, atol=1e-5)
    export_onnx(head, (6,), tmp_path / "head.onnx", ["score"])
    ops = [node.op_type for node in onnx.load(str(tmp_path / "head.onnx")).graph.node]
    assert "Sub" not in ops and "Div" not in ops


def test_logit_margin_is_top_one_minus_top_two() -> None:
    from marginwatch.calibration.scores import logit_margin

    logits = torch.tensor([[1.0, 5.0, 3.5], [-2.0, -2.0, -7.0], [0.1, 0.3, 0.2]])
    torch.testing.assert_close(
        logit_margin(logits), torch.tensor([1.5, 0.0, 0.1]), rtol=0, atol=1e-7
    )
