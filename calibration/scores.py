"""The score, written once, and the serving graph that carries it.

Calibration computes scores by running `ServingGraph`, and the service runs the same graph
exported to ONNX, so the two cannot disagree about what the score is.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from models.architectures import SplitClassifier

ScoreInput = Literal["features", "logits"]


def logit_margin(logits: torch.Tensor) -> torch.Tensor:
    """Top-1 minus top-2 logit: needs no label, and ranks samples like the input margin on
    margin-consistent models."""
    top_two = logits.topk(2, dim=1).values
    return top_two[:, 0] - top_two[:, 1]


class PseudoMarginHead(nn.Module):
    """An MLP that regresses √(input margin) from penultimate features or logits (the paper's
    pseudo-margin for models whose logit margin does not rank like the input margin)."""

    input_mean: torch.Tensor
    input_std: torch.Tensor

    def __init__(self, in_features: int, hidden: int = 256, layers: int = 2) -> None:
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

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.mlp((inputs - self.input_mean) / self.input_std).squeeze(1)


class ServingGraph(nn.Module):
    """`model` plus its score: outputs (`logits`, `score`), the contract of the served ONNX file."""

    def __init__(
        self,
        model: SplitClassifier,
        pseudo_margin: PseudoMarginHead | None = None,
        score_input: ScoreInput = "features",
    ) -> None:
        super().__init__()
        self.model = model
        self.pseudo_margin = pseudo_margin
        self.score_input = score_input

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.features(inputs)
        logits = self.model.head(features)
        if self.pseudo_margin is None:
            return logits, logit_margin(logits)
        source = features if self.score_input == "features" else logits
        return logits, self.pseudo_margin(source)
