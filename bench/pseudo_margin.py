"""Pseudo-margin on models that are not margin-consistent (not part of the tests).

    .venv/bin/python bench/pseudo_margin.py            # after bench/fidelity.py filled the cache

Two models: the shipped `fmnist-cnn-pgd`, and the same network with its logits multiplied by a
positive factor that depends on the input, exp(α·tanh(u·features)). Decisions, and so input
margins, are unchanged; logit margins are scrambled, which is what an inconsistent model looks
like. Input margins come from `bench/fidelity.py`'s cache (every test point, 1,000 training
points, the job's attack ensemble). The pseudo-margin (the job's `PseudoMarginRegressor`) is fit
on the training points and evaluated on the held-out test points: Kendall τ and AUROC before
(logit margin) and after (pseudo-margin), for features and for logits as its input.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from marginwatch.calibration import margin_cache
from marginwatch.calibration.config import NORM_VALUES
from marginwatch.calibration.job import subset_indices
from marginwatch.calibration.metrics import detection_metrics, kendall_tau, nonrobust_mask
from marginwatch.calibration.pseudo_margin import PseudoMarginRegressor
from marginwatch.calibration.scores import logit_margin
from marginwatch.models.architectures import SplitClassifier
from marginwatch.models.data import load_dataset
from marginwatch.models.registry import load_model

ROOT = Path(__file__).resolve().parents[1]


class ScrambledLogits(SplitClassifier):
    """`base` with logits scaled by exp(α·tanh(u·features)): same argmax, same input margins."""

    def __init__(self, base: SplitClassifier, alpha: float = 2.0, seed: int = 0) -> None:
        super().__init__()
        self.base = base
        self.input_shape = base.input_shape
        self.num_classes = base.num_classes
        self.feature_dim = base.feature_dim
        generator = torch.Generator().manual_seed(seed)
        direction = torch.randn(base.feature_dim, generator=generator)
        self.register_buffer("direction", direction / direction.norm())
        self.alpha = alpha

    def features(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.base.features(inputs)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        projection = (features - features.mean(1, keepdim=True)) @ self.direction
        scale = torch.exp(self.alpha * torch.tanh(projection / (features.std() + 1e-6)))
        return self.base.head(features) * scale[:, None]


@torch.no_grad()
def outputs(model: SplitClassifier, images: np.ndarray) -> tuple[np.ndarray, ...]:
    features = model.features(torch.from_numpy(images))
    logits = model.head(features)
    return features.numpy(), logits.numpy(), logit_margin(logits).numpy()


def cached_margins(cache: Path, model: SplitClassifier, size: int, tag: str, plan):  # type: ignore[no-untyped-def]
    key = margin_cache.cache_key(margin_cache.state_dict_sha256(model), tag, np.arange(size), plan)
    return margin_cache.load_chunks(cache / key, size, plan)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=ROOT / "bench" / "cache")
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--pseudo-train-size", type=int, default=1000)
    parser.add_argument("--alpha", type=float, default=2.0, help="scrambling strength")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "pseudo.json")
    args = parser.parse_args()
    plan = margin_cache.AttackPlan(("fmn", "fab-top3"), (100, 100), NORM_VALUES["linf"])
    base = load_model("fmnist-cnn-pgd")
    test, train = load_dataset("fashion-mnist", "test"), load_dataset("fashion-mnist", "train")
    train_images = train.float_images[subset_indices(args.pseudo_train_size, len(train), 12345)]
    test_m = cached_margins(args.cache, base, len(test), "test-all", plan)
    train_m = cached_margins(args.cache, base, len(train_images), "train-pm", plan)
    nonrobust = nonrobust_mask(test_m.radius, test_m.success, args.eps)
    figures: dict[str, float] = {}
    for name, model in [("pgd", base), ("scrambled", ScrambledLogits(base, args.alpha).eval())]:
        test_features, test_logits, test_scores = outputs(model, test.float_images)
        train_features, train_logits, _ = outputs(model, train_images)
        figures[f"{name}/logit-margin/tau"] = kendall_tau(test_m.radius, test_scores)
        figures[f"{name}/logit-margin/auroc"] = detection_metrics(nonrobust, test_scores).auroc
        for source, train_x, test_x in [
            ("features", train_features, test_features),
            ("logits", train_logits, test_logits),
        ]:
            pseudo = PseudoMarginRegressor().fit(train_x, train_m.finite_radius).predict(test_x)
            figures[f"{name}/pseudo-{source}/tau"] = kendall_tau(test_m.radius, pseudo)
            figures[f"{name}/pseudo-{source}/auroc"] = detection_metrics(nonrobust, pseudo).auroc
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    for key, value in figures.items():
        print(f"{key:36s} {value:.4f}")


if __name__ == "__main__":
    main()
