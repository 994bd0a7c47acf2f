"""The score, written once, and the serving graph that carries it, with its verified export.

Calibration computes scores by running `ServingGraph`, and the service runs the same graph
exported to ONNX, so the two cannot disagree about what the score is.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Literal, cast

import numpy as np
import torch
from torch import nn

from marginwatch.artifact.graph import LOGITS, OUTPUTS, SCORE
from marginwatch.artifact.schema import ONNX_FILE
from marginwatch.calibration.config import CalibrationError
from marginwatch.models.architectures import SplitClassifier
from marginwatch.models.export import export_onnx, verify_export

ScoreInput = Literal["features", "logits"]


def logit_margin(logits: torch.Tensor) -> torch.Tensor:
    """Top-1 minus top-2 logit: needs no label, and ranks samples like the input margin on
    margin-consistent models."""
    top_two = logits.topk(2, dim=1).values
    # a product with (1, −1) is the same subtraction (both products are exact) and exports as
    # one MatMul node instead of two slices and a Sub: the flag's cost at batch 1 is per node
    return top_two @ torch.tensor([1.0, -1.0], dtype=logits.dtype, device=logits.device)


class PseudoMarginHead(nn.Module):
    """An MLP that regresses √(input margin) from penultimate features or logits (the paper's
    pseudo-margin for models whose logit margin does not rank like the input margin)."""

    input_mean: torch.Tensor
    input_std: torch.Tensor

    def __init__(self, in_features: int, hidden: int = 64, layers: int = 2) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        width = in_features
        for _ in range(layers):
            blocks += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        blocks.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*blocks)
        self.register_buffer("input_mean", torch.zeros(in_features))
        self.register_buffer("input_std", torch.ones(in_features))
        self.standardizes = True

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.standardizes:
            inputs = (inputs - self.input_mean) / self.input_std
        return self.mlp(inputs).squeeze(1)

    @torch.no_grad()
    def fold_standardization(self) -> None:
        """Fold (x − μ)/σ into the first linear layer, W/σ and b − W·μ/σ, so the exported
        graph has two nodes fewer; outputs are unchanged up to float rounding."""
        if not self.standardizes:
            return
        first = cast(nn.Linear, self.mlp[0])
        scaled = first.weight / self.input_std
        first.bias.sub_(scaled @ self.input_mean)
        first.weight.copy_(scaled)
        self.input_mean.zero_()
        self.input_std.fill_(1.0)
        self.standardizes = False


def guarded_score(pseudo: torch.Tensor, logits: torch.Tensor, guard_scale: float) -> torch.Tensor:
    """min(pseudo-margin, κ · logit margin): brittle (score < λ) when either is low. Its numpy
    twin, for scores computed outside the graph, is `artifact.flags.guarded_score_np`.

    A point just past a decision boundary has a logit margin near 0 by construction, while a
    learned pseudo-margin can extrapolate there to a large value (docs/benchmarks.md, "Boundary
    recall"); the minimum keeps the pseudo-margin's ranking of clean inputs and adds the logit
    margin's catch of those points. κ (> 0) puts the logit margin on the pseudo-margin's scale.
    """
    return torch.minimum(pseudo, logit_margin(logits) * guard_scale)


class ServingGraph(nn.Module):
    """`model` plus its score: outputs (`logits`, `score`), the contract of the served ONNX file.

    The score is the logit margin, or the pseudo-margin head's output, or, with `guard_scale`,
    `guarded_score` of the two."""

    def __init__(
        self,
        model: SplitClassifier,
        pseudo_margin: PseudoMarginHead | None = None,
        score_input: ScoreInput = "features",
        guard_scale: float | None = None,
    ) -> None:
        super().__init__()
        if guard_scale is not None and not (pseudo_margin is not None and guard_scale > 0):
            raise ValueError(f"a guard scale needs a pseudo-margin and must be > 0: {guard_scale}")
        self.model = model
        self.pseudo_margin = pseudo_margin
        self.score_input = score_input
        self.guard_scale = guard_scale

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pseudo_margin is not None and self.score_input == "features":
            features, logits = self.model.features_and_logits(inputs)
            return logits, self._learned(self.pseudo_margin(features), logits)
        # The model's own forward: where features and logits come from two passes (a model
        # with features() but no head()), a score that needs no features costs one.
        logits = self.model(inputs)
        if self.pseudo_margin is None:
            return logits, logit_margin(logits)
        return logits, self._learned(self.pseudo_margin(logits), logits)

    def _learned(self, pseudo: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self.guard_scale is None:
            return pseudo
        return guarded_score(pseudo, logits, self.guard_scale)


def export_serving_graph(
    graph: ServingGraph, input_shape: tuple[int, ...], inputs: np.ndarray, folder: Path | None
) -> tuple[np.ndarray, np.ndarray, float]:
    """Export into `folder` (None: into memory, the preflight's trial), check ONNX Runtime
    against torch (≤ 1e-4 × max(1, largest |value|) on logits and score, equal labels, no
    label flip between batch 1 and 64), and measure the guard band: the largest score change
    between batch 1 and batch 64.
    Returns ONNX Runtime's labels and scores, and the band."""
    target: Path | io.BytesIO = io.BytesIO() if folder is None else folder / ONNX_FILE
    graph = graph.cpu().eval()
    export_onnx(graph, input_shape, target, list(OUTPUTS))
    source = target.getvalue() if isinstance(target, io.BytesIO) else target
    with torch.no_grad():
        torch_logits, torch_scores = graph(torch.from_numpy(inputs))
    logits_check, score_check = (
        verify_export(source, reference, inputs, output, torch_logits)
        for output, reference in ((LOGITS, torch_logits), (SCORE, torch_scores))
    )
    problems = logits_check.problems(1e-4) + score_check.problems(1e-4)
    if problems:
        raise CalibrationError("; ".join(problems))
    return score_check.labels, score_check.values, score_check.max_abs_diff_batch1_vs_64
