"""Pseudo-margin: a small MLP that learns the input margin from features, for models whose
logit margin does not rank samples like their input margin (low Kendall τ).

Follows the paper (Ngnawé et al., NeurIPS 2024, §5): regress √(input margin) with MSE on
attacked training points. Censored margins (every attack failed) enter at their lower bound,
which keeps their rank at the top, where it belongs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from marginwatch.calibration.estimators import NotFittedError
from marginwatch.calibration.metrics import kendall_tau
from marginwatch.calibration.progress import Advance, ignore, phase
from marginwatch.calibration.scores import PseudoMarginHead

PATH_STEPS = (0.5, 0.75, 0.9, 1.0)
"""Where on the segment x → x* the path points lie (1: the adversarial point itself)."""


def path_training_points(
    images: np.ndarray, adv_inputs: np.ndarray, margins: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Points x + t(x* − x) on the attack paths of the points whose attack succeeded (finite
    `margins` = ‖x* − x‖), one block per t in PATH_STEPS, with the regression target
    (1 − t)·‖x* − x‖: an upper bound of their margin, since x* is past the boundary. Trained on
    them as well, the pseudo-margin learns small values just before and past a boundary, where
    trained on clean points alone it extrapolates (docs/benchmarks.md, "Boundary recall")."""
    found = np.isfinite(margins)
    x, adv, r = images[found], adv_inputs[found], margins[found]
    points = [x + t * (adv - x) for t in PATH_STEPS]
    targets = [(1 - t) * r for t in PATH_STEPS]
    return np.concatenate(points).astype(np.float32), np.concatenate(targets)


def regression_targets(margins: np.ndarray) -> np.ndarray:
    """√margin, with unbounded (infinite) censored margins set to the largest finite one."""
    finite = np.isfinite(margins)
    ceiling = margins[finite].max() if finite.any() else 1.0
    return np.sqrt(np.where(finite, margins, ceiling)).astype(np.float32)


def train_head(
    head: PseudoMarginHead,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    epochs: int,
    learning_rate: float,
    weight_decay: float,
    advance: Advance = ignore,
) -> list[float]:
    """Full-batch Adam on MSE; the data is small (hundreds to thousands of points). `advance`
    hears of each epoch done."""
    head.input_mean.copy_(inputs.mean(0))
    head.input_std.copy_(inputs.std(0).clamp_min(1e-6))
    optimizer = torch.optim.Adam(head.parameters(), lr=learning_rate, weight_decay=weight_decay)
    losses = []
    head.train()
    for _ in range(epochs):
        loss = F.mse_loss(head(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        advance(1)
    head.eval()
    head.fold_standardization()
    return losses


@dataclass(kw_only=True, eq=False)
class PseudoMarginRegressor:
    """scikit-learn-shaped: `fit(features, margins)`, `predict(features)`, `score(...)` (τ); the
    fields are the hyperparameters (and `verbose`: a progress bar of the epochs, on stderr),
    `fit` sets `head_` and `losses_`."""

    hidden: int = 64
    layers: int = 2
    epochs: int = 500
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    verbose: bool = False

    def fit(self, features: np.ndarray, margins: np.ndarray) -> PseudoMarginRegressor:
        torch.manual_seed(self.seed)
        head = PseudoMarginHead(features.shape[1], self.hidden, self.layers)
        bar = phase("pseudo-margin training", self.epochs, enabled=self.verbose, unit="epoch")
        with bar as advance:
            self.losses_ = train_head(
                head,
                torch.as_tensor(features, dtype=torch.float32),
                torch.from_numpy(regression_targets(margins)),
                epochs=self.epochs,
                learning_rate=self.learning_rate,
                weight_decay=self.weight_decay,
                advance=advance,
            )
        self.head_ = head
        return self

    def predict(self, features: np.ndarray) -> np.ndarray:
        if not hasattr(self, "head_"):
            raise NotFittedError("PseudoMarginRegressor is not fitted: call fit first")
        with torch.no_grad():
            return self.head_(torch.as_tensor(features, dtype=torch.float32)).numpy()

    def score(self, features: np.ndarray, margins: np.ndarray) -> float:
        """Kendall τ between predicted pseudo-margins and input margins."""
        return kendall_tau(margins, self.predict(features))
