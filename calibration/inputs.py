"""What the job works on: the model and the data, loaded and fitted to each other, and the
model's outputs on a set of images.

The dataset comes first, because a model that does not carry its own facts takes them from it:
the input shape from the images, the class count checked against the class names, and the
normalisation it expects (`--input-range`, `--mean`, `--std`) wrapped around it, so that the
attacks and the exported graph both see [0, 1] inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from marginwatch.calibration.config import CalibrationConfig, ConfigError
from marginwatch.calibration.scores import logit_margin
from marginwatch.models.architectures import Normalized, SplitClassifier
from marginwatch.models.data import DataError, Dataset, has_train_split, load_dataset
from marginwatch.models.registry import ModelError, image_shape, load_model


@dataclass(frozen=True)
class Inputs:
    model: SplitClassifier
    data: Dataset
    train_data: Dataset | None  # None: draw pseudo-margin training points from `data`
    subset_size: int  # --subset-size, or every point of `data` when it holds fewer by default

    @property
    def pseudo_pool(self) -> int:
        """The points the pseudo-margin's training points are drawn from: the train split's,
        else those of `data` outside the subset."""
        if self.train_data is not None:
            return len(self.train_data)
        return len(self.data) - self.subset_size


@dataclass(frozen=True)
class Outputs:
    """The model's outputs on a set of inputs: predicted labels, logit margins, features."""

    labels: np.ndarray
    scores: np.ndarray
    features: np.ndarray
    logits: np.ndarray

    def take(self, indices: np.ndarray) -> Outputs:
        return Outputs(
            self.labels[indices], self.scores[indices], self.features[indices], self.logits[indices]
        )

    def score_inputs(self, kind: str) -> np.ndarray:
        return self.features if kind == "features" else self.logits


def load_model_for(config: CalibrationConfig, data: Dataset) -> SplitClassifier:
    """The configured model, fitted to `data` (input shape, class count) and wrapped in its
    normalisation when it expects inputs other than [0, 1]; `ConfigError` on any mismatch."""
    return load_model_shaped(
        config, image_shape(data.images), len(data.class_names), what="data has shape"
    )


def load_model_shaped(
    config: CalibrationConfig,
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    what: str,
) -> SplitClassifier:
    """The configured model for inputs of `input_shape` and `num_classes` classes (a dataset's,
    or a served version's: `what` names it in the message when the model expects others)."""
    try:
        model = load_model(
            config.model, config.weights, input_shape=input_shape, num_classes=num_classes
        )
    except ModelError as error:
        raise ConfigError(str(error)) from error
    if tuple(input_shape) != tuple(model.input_shape):
        raise ConfigError(
            f"{what} {tuple(input_shape)} per image but the model expects "
            f"{tuple(model.input_shape)}"
        )
    if not config.normalizes:
        return model
    try:
        return Normalized(model, input_range=config.input_range, mean=config.mean, std=config.std)
    except ValueError as error:
        raise ConfigError(str(error)) from error


def load_inputs(config: CalibrationConfig) -> Inputs:
    """Data (in `--class-names`' order) and model, with shapes checked against each other, and
    the subset's size; `ConfigError` on any problem."""
    names = config.class_names or None
    try:
        data = load_dataset(config.dataset, config.split, config.data_dir, class_names=names)
    except DataError as error:
        raise ConfigError(str(error)) from error
    model = load_model_for(config, data)
    train_data = None
    if (
        config.split == "test"
        and config.pseudo_margin != "never"
        and has_train_split(config.dataset)
    ):
        try:
            train_data = load_dataset(config.dataset, "train", config.data_dir, class_names=names)
        except DataError:
            train_data = None  # single-split sources: use the points outside the subset
    size = subset_size(config, len(data))
    return Inputs(model.to(config.torch_device), data, train_data, size)


def subset_size(config: CalibrationConfig, available: int) -> int:
    """`--subset-size`, which the data must hold; by default 500, or every point when fewer."""
    source = f"{config.dataset}:{config.split}"
    if available < 2:
        raise ConfigError(f"{source} has {available} image(s); calibration needs at least 2")
    if config.subset_size <= available:
        return config.subset_size
    if "subset_size" in config.model_fields_set:
        raise ConfigError(
            f"--subset-size {config.subset_size} asked for, but {source} has only {available} "
            f"images: give --subset-size {available} or less, or leave it out to attack them all"
        )
    return available


@torch.no_grad()
def forward_all(model: SplitClassifier, inputs: np.ndarray, device: torch.device) -> Outputs:
    features, logits = [], []
    for start in range(0, len(inputs), 500):
        batch = torch.from_numpy(inputs[start : start + 500]).to(device)
        batch_features, batch_logits = model.features_and_logits(batch)
        features.append(batch_features.cpu())
        logits.append(batch_logits.cpu())
    all_logits = torch.cat(logits)
    return Outputs(
        labels=all_logits.argmax(1).numpy(),
        scores=logit_margin(all_logits).numpy(),
        features=torch.cat(features).numpy(),
        logits=all_logits.numpy(),
    )


def subset_indices(size: int, population: int, seed: int) -> np.ndarray:
    """A uniform random subset, so the estimators stay unbiased for any class balance."""
    return np.sort(np.random.default_rng(seed).choice(population, size, replace=False))
