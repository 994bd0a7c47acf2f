"""The whole chain beyond 1×28×28: a generated CIFAR-shaped (3×32×32) image folder of PNG, JPEG
and WebP files → PreAct-ResNet-18 → `marginwatch-calibrate` → a published version → the
service's engine, whose labels must be torch's and whose flag must be `score < λ`."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from marginwatch.artifact import store
from marginwatch.calibration.__main__ import main
from marginwatch.calibration.scores import logit_margin
from marginwatch.models.architectures import SplitClassifier
from marginwatch.models.data import Dataset, load_dataset
from marginwatch.models.registry import save_weights
from marginwatch.service.engine import EngineOptions, ServedModel

CLASSES = ("blue-checks", "green-columns", "red-rows", "yellow-disc")
PER_CLASS = 24
SUFFIXES = (".png", ".jpg", ".webp")
# Factories, because the architecture name `preact-resnet18` builds a 10-class head and this
# folder has 4 classes. `small_cnn` keeps the chain in the fast tests (about 6 s): PreAct-ResNet-18
# takes 1-2 minutes on 2 shared CPU cores. Both name their last layer `linear` for `quick_fit`.
FACTORIES = f"""
from torch import nn
import torch.nn.functional as F
from marginwatch.models.architectures import PreActResNet18, SplitClassifier


class SmallCNN(SplitClassifier):
    def __init__(self):
        super().__init__()
        self.input_shape = (3, 32, 32)
        self.num_classes = {len(CLASSES)}
        self.feature_dim = 64
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 8 * 8, self.feature_dim)
        self.linear = nn.Linear(self.feature_dim, self.num_classes)

    def features(self, inputs):
        hidden = F.max_pool2d(F.relu(self.conv1(inputs)), 2)
        hidden = F.max_pool2d(F.relu(self.conv2(hidden)), 2)
        return F.relu(self.fc(hidden.flatten(1)))

    def head(self, features):
        return self.linear(features)


def preact_resnet18():
    return PreActResNet18(num_classes={len(CLASSES)})


def small_cnn():
    return SmallCNN()
"""


def pattern(label: int, rng: np.random.Generator) -> np.ndarray:
    """A 32×32 RGB pattern per class (colour and geometry both tell), with a random phase,
    brightness and noise, so that no two images are equal."""
    rows, cols = np.mgrid[0:32, 0:32]
    phase = rng.integers(0, 8)
    mask = [
        ((rows // 4 + cols // 4 + phase) % 2 == 0),
        ((cols + phase) // 4 % 2 == 0),
        ((rows + phase) // 4 % 2 == 0),
        ((rows - 16 - phase / 4) ** 2 + (cols - 16) ** 2 < 100),
    ][label]
    tint = np.array([(40, 60, 220), (40, 200, 60), (220, 40, 40), (230, 210, 30)][label])
    pixels = np.where(mask[..., None], tint * rng.uniform(0.8, 1.0), 30.0)
    pixels += rng.normal(0, 12, pixels.shape)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def write_pattern_folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for index in range(PER_CLASS):
            suffix = SUFFIXES[index % len(SUFFIXES)]
            Image.fromarray(pattern(label, rng)).save(root / name / f"{index:03d}{suffix}")


def quick_fit(model: SplitClassifier, data: Dataset) -> torch.Tensor:
    """Seconds instead of minutes of training on 2 cores: batch-norm statistics from one pass
    over the data, then only the last layer trained, on the trunk's random features. Returns
    the trained model's logits on `data`."""
    inputs = torch.from_numpy(data.float_images)
    batch_norms = [module for module in model.modules() if isinstance(module, nn.BatchNorm2d)]
    for module in batch_norms:
        module.reset_running_stats()
        module.momentum = None  # a cumulative average over the batches of this pass
    with torch.no_grad():
        if batch_norms:
            model.train()
            model.features(inputs)
        model.eval()
        features = model.features(inputs)
    last = cast(nn.Linear, model.linear)
    labels = torch.from_numpy(data.labels)
    optimiser = torch.optim.Adam(last.parameters(), lr=0.05)
    for _ in range(100):
        optimiser.zero_grad()
        F.cross_entropy(last(features), labels).backward()
        optimiser.step()
    with torch.no_grad():
        return model.head(features)


@pytest.mark.parametrize(
    "factory", [pytest.param("preact_resnet18", marks=pytest.mark.slow), "small_cnn"]
)
def test_image_folder_calibrates_publishes_and_serves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, factory: str
) -> None:
    torch.manual_seed(0)
    folder = tmp_path / "patterns"
    write_pattern_folder(folder)
    data = load_dataset(str(folder), "test")
    assert data.images.shape == (len(CLASSES) * PER_CLASS, 3, 32, 32)
    assert data.class_names == CLASSES
    module = f"patterns_{factory}"  # one module name per case: imports are cached
    (tmp_path / f"{module}.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    model = cast(SplitClassifier, getattr(importlib.import_module(module), factory)())
    trained_logits = quick_fit(model, data)
    assert (trained_logits.argmax(1).numpy() == data.labels).mean() >= 0.9  # it learned them

    weights = tmp_path / f"{factory}.safetensors"
    save_weights(model, weights)
    store_dir = tmp_path / "store"
    code = main(["--store", str(store_dir), "--dataset", str(folder),
                 "--model", f"{module}:{factory}", "--weights", str(weights),
                 "--name", "patterns", "--version", "v1", "--eps", str(8 / 255),
                 "--subset-size", "20", "--attack", "fmn:5", "--bootstrap", "20",
                 "--pseudo-margin", "never", "--quiet"])  # fmt: skip
    assert code == 0

    version_dir = store.current_dir(store_dir, "patterns")
    record = store.read_record(version_dir)
    assert version_dir.name == "v1"
    assert record.input_shape == [3, 32, 32] and record.class_names == list(CLASSES)
    assert record.subset.size == 20 and record.big_set.size == len(data)
    served = ServedModel("patterns", version_dir, EngineOptions(device="cpu"))
    served.load()
    chosen = np.arange(0, len(data), 5)  # every class, every file format
    inputs = data.float_images[chosen]
    prediction = served.predict(inputs)
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(inputs))
    np.testing.assert_array_equal(prediction.labels, torch_logits.argmax(1).numpy())
    np.testing.assert_allclose(prediction.scores, logit_margin(torch_logits).numpy(), atol=1e-4)
    # the rule in float64, as served: a float32 comparison would round λ (artifact/flags.py)
    np.testing.assert_array_equal(
        prediction.brittle, prediction.scores.astype(np.float64) < record.threshold
    )
