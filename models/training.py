"""Training recipes (standard, ℓ∞ PGD adversarial training, SOVR) and their evaluation.

Everything is seeded: the same seed, data and recipe give the same weights on the same machine.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from marginwatch.models.architectures import SplitClassifier
from marginwatch.models.data import Dataset
from marginwatch.models.pgd import pgd_linf

RecipeName = Literal["standard", "pgd", "sovr"]
RECIPES: tuple[RecipeName, ...] = ("standard", "pgd", "sovr")


@dataclass(frozen=True)
class Recipe:
    """How to train. `eps`, `attack_steps` apply to `pgd` and `sovr`; `sovr_fraction` to `sovr`."""

    name: RecipeName
    epochs: int = 8
    batch_size: int = 128
    learning_rate: float = 1e-3
    eps: float = 0.1
    attack_steps: int = 7
    sovr_fraction: float = 0.4

    def __post_init__(self) -> None:
        if self.name not in RECIPES:
            raise ValueError(f"unknown recipe {self.name!r}: use one of {', '.join(RECIPES)}")
        if self.epochs < 1 or self.batch_size < 1 or self.learning_rate <= 0:
            raise ValueError("epochs, batch size and learning rate must be positive")
        if self.name != "standard" and (self.eps <= 0 or self.attack_steps < 1):
            raise ValueError("adversarial recipes need eps > 0 and at least one attack step")
        if not 0 < self.sovr_fraction <= 1:
            raise ValueError("sovr_fraction must lie in (0, 1]")


def logit_margin_to_label(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """z_y − max_{k≠y} z_k: positive where the sample is classified correctly."""
    true_logit = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return true_logit - others.max(dim=1).values


def one_vs_rest_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample sum of binary logistic losses: the true class against each other class."""
    signs = -torch.ones_like(logits).scatter(1, labels[:, None], 1.0)
    return F.softplus(-signs * logits).sum(dim=1)


def sovr_loss(logits: torch.Tensor, labels: torch.Tensor, fraction: float) -> torch.Tensor:
    """SOVR (Kanai et al., ICML 2023): one-vs-the-rest loss on the `fraction` of the batch with
    the smallest logit margins, cross-entropy on the rest; OVR widens exactly those margins."""
    margins = logit_margin_to_label(logits.detach(), labels)
    count = max(1, round(fraction * len(labels)))
    switched = torch.zeros(len(labels), dtype=torch.bool, device=logits.device)
    switched[margins.argsort()[:count]] = True
    per_sample = torch.where(
        switched,
        one_vs_rest_loss(logits, labels),
        F.cross_entropy(logits, labels, reduction="none"),
    )
    return per_sample.mean()


def _batch_loss(
    model: SplitClassifier,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    recipe: Recipe,
    generator: torch.Generator,
) -> torch.Tensor:
    if recipe.name == "standard":
        return F.cross_entropy(model(inputs), labels)
    model.eval()  # attack the model as it will be served (matters for batch norm)
    adversarial = pgd_linf(
        model, inputs, labels, eps=recipe.eps, steps=recipe.attack_steps, generator=generator
    )
    model.train()
    logits = model(adversarial)
    if recipe.name == "pgd":
        return F.cross_entropy(logits, labels)
    return sovr_loss(logits, labels, recipe.sovr_fraction)


def train(
    model: SplitClassifier, data: Dataset, recipe: Recipe, *, seed: int, progress: bool = True
) -> list[float]:
    """Train `model` in place; returns the mean loss of each epoch."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images = torch.from_numpy(data.float_images)
    labels = torch.from_numpy(data.labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.learning_rate)
    steps_per_epoch = (len(data) + recipe.batch_size - 1) // recipe.batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=recipe.learning_rate, total_steps=recipe.epochs * steps_per_epoch
    )
    epoch_losses = []
    for epoch in range(recipe.epochs):
        model.train()
        order = torch.randperm(len(data), generator=generator)
        total = 0.0
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"{recipe.name} epoch {epoch + 1}/{recipe.epochs}",
            disable=not progress,
            unit="batch",
        )
        for step in bar:
            batch = order[step * recipe.batch_size : (step + 1) * recipe.batch_size]
            loss = _batch_loss(model, images[batch], labels[batch], recipe, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(batch)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        epoch_losses.append(total / len(data))
    model.eval()
    return epoch_losses


@dataclass(frozen=True)
class Evaluation:
    samples: int
    clean_accuracy: float
    robust_accuracy: float
    eps: float
    attack: str


def evaluate(
    model: SplitClassifier,
    data: Dataset,
    *,
    eps: float,
    steps: int = 20,
    batch_size: int = 500,
    seed: int = 0,
    progress: bool = True,
) -> Evaluation:
    """Clean accuracy and ℓ∞ PGD-`steps` robust accuracy (a misclassified point is non-robust)."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    clean = robust = 0
    for start in tqdm(
        range(0, len(data), batch_size), desc=f"PGD-{steps} eval", disable=not progress
    ):
        inputs = torch.from_numpy(data.float_images[start : start + batch_size])
        labels = torch.from_numpy(data.labels[start : start + batch_size])
        with torch.no_grad():
            correct = model(inputs).argmax(1) == labels
        adversarial = pgd_linf(model, inputs, labels, eps=eps, steps=steps, generator=generator)
        with torch.no_grad():
            still_correct = model(adversarial).argmax(1) == labels
        clean += int(correct.sum())
        robust += int((correct & still_correct).sum())
    return Evaluation(len(data), clean / len(data), robust / len(data), eps, f"pgd-linf-{steps}")


def model_card(
    *,
    model_name: str,
    architecture: str,
    recipe: Recipe,
    seed: int,
    train_data: str,
    train_samples: int,
    evaluation: Evaluation,
    eval_data: str,
    weights_sha256: str,
    seconds: float,
) -> dict[str, object]:
    return {
        "name": model_name,
        "architecture": architecture,
        "input_range": [0.0, 1.0],
        "train_data": train_data,
        "train_samples": train_samples,
        "recipe": asdict(recipe),
        "seed": seed,
        "evaluation": {"data": eval_data, **asdict(evaluation)},
        "weights_sha256": weights_sha256,
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "train_seconds": round(seconds, 1),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
