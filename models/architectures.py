"""Classifier architectures, each split into `features(x)` and `head(features)`.

The split is what the pseudo-margin needs (it reads penultimate features) and what the ONNX
export exposes as a second output. Every model takes float32 inputs in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn


class SplitClassifier(nn.Module):
    """A classifier whose logits are `head(features(x))`."""

    input_shape: tuple[int, int, int]
    num_classes: int
    feature_dim: int

    def features(self, inputs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def head(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(inputs))

    def features_and_logits(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both from one pass: what the calibration's forward pass and a pseudo-margin on
        features read. A model whose logits do not come from `head` overrides it."""
        features = self.features(inputs)
        return features, self.head(features)


class FashionMnistCNN(SplitClassifier):
    """Two conv blocks and a 128-unit penultimate layer: about 420 k parameters, 1.7 MB."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.input_shape = (1, 28, 28)
        self.num_classes = num_classes
        self.feature_dim = 128
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 7 * 7, self.feature_dim)
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def features(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = F.max_pool2d(F.relu(self.conv1(inputs)), 2)
        hidden = F.max_pool2d(F.relu(self.conv2(hidden)), 2)
        return F.relu(self.fc(hidden.flatten(1)))

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features)


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)
            )

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(inputs))
        shortcut = self.shortcut(out) if self.shortcut is not None else inputs
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(SplitClassifier):
    """PreAct-ResNet-18 for 3×32×32 inputs, laid out like the robust CIFAR-10 checkpoints of the
    adversarial-training literature (`conv1`, `layer1..4`, `bn`, `linear`), so their state dicts
    load directly. `mean`/`std` normalise inside the model, keeping its input range [0, 1]; they
    are constructor arguments, not state, because those checkpoints do not carry them."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        num_classes: int = 10,
        mean: tuple[float, float, float] = (0.0, 0.0, 0.0),
        std: tuple[float, float, float] = (1.0, 1.0, 1.0),
    ) -> None:
        super().__init__()
        self.input_shape = (3, 32, 32)
        self.num_classes = num_classes
        self.feature_dim = 512
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.in_planes = 64
        self.layer1 = self._make_layer(64, 2, stride=1)
        self.layer2 = self._make_layer(128, 2, stride=2)
        self.layer3 = self._make_layer(256, 2, stride=2)
        self.layer4 = self._make_layer(512, 2, stride=2)
        self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for block_stride in [stride] + [1] * (blocks - 1):
            layers.append(PreActBlock(self.in_planes, planes, block_stride))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def features(self, inputs: torch.Tensor) -> torch.Tensor:
        out = self.conv1((inputs - self.mean) / self.std)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features)


def _call(module: nn.Module, method: str, *args: torch.Tensor) -> Any:
    """A user module's method by name: nn.Module's `__getattr__` types every attribute as a
    tensor or a module, and a TorchScript module's exported methods are neither."""
    return getattr(module, method)(*args)


class _Adapter(SplitClassifier):
    """A user's model (TorchScript, ExportedProgram, ONNX, factory) that is no
    `SplitClassifier`, with the facts it does not carry: the input shape comes from the
    dataset, class count and feature width from a forward pass (`registry.adapt`)."""

    def __init__(
        self,
        module: nn.Module,
        input_shape: tuple[int, int, int],
        num_classes: int,
        feature_dim: int,
    ) -> None:
        super().__init__()
        self.module = module
        self.input_shape = input_shape
        self.num_classes = num_classes
        self.feature_dim = feature_dim

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.module(inputs))


class LogitsAsFeatures(_Adapter):
    """A plain classifier with no features/head split: its logits serve as features (the
    pseudo-margin then reads logits) and the head is the identity."""

    def __init__(
        self, module: nn.Module, input_shape: tuple[int, int, int], num_classes: int
    ) -> None:
        super().__init__(module, input_shape, num_classes, num_classes)

    def features(self, inputs: torch.Tensor) -> torch.Tensor:
        return self(inputs)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return features

    def features_and_logits(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(inputs)
        return logits, logits


class FeaturesAndForward(_Adapter):
    """A model with `features(x)` but no `head`: the features reach the pseudo-margin, the
    logits are its `forward`. Where the module offers `features_and_logits` (an ONNX graph with
    both outputs) one pass gives both; otherwise the trunk runs twice."""

    def features(self, inputs: torch.Tensor) -> torch.Tensor:
        return _call(self.module, "features", inputs)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("this model has no head(): its logits come from forward()")

    def features_and_logits(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if hasattr(self.module, "features_and_logits"):
            features, logits = _call(self.module, "features_and_logits", inputs)
            return features, logits
        return self.features(inputs), self(inputs)


class FeaturesAndHead(_Adapter):
    """A model with both `features(x)` and `head(features)` (a TorchScript file exporting
    them, say) that does not carry its input shape."""

    def features(self, inputs: torch.Tensor) -> torch.Tensor:
        return _call(self.module, "features", inputs)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return _call(self.module, "head", features)


class Normalized(SplitClassifier):
    """`model` behind the affine map from [0, 1] to the inputs it was trained on: scaled to
    `input_range`, then `(x − mean) / std` per channel. Attacks see [0, 1] inputs, so ε stays
    in pixel space (as in RobustBench), and the map is part of the exported serving graph, so
    the service keeps sending [0, 1] inputs. Folded into one multiply-add; persistent buffers,
    so the calibration's cache key changes with them."""

    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(
        self,
        model: SplitClassifier,
        *,
        input_range: tuple[float, float],
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ) -> None:
        super().__init__()
        channels = model.input_shape[0]
        for name, values in (("mean", mean), ("std", std)):
            if len(values) not in (1, channels):
                raise ValueError(
                    f"{name} has {len(values)} values for a model with {channels}-channel inputs"
                )
        low, high = input_range
        mean_t = torch.tensor(mean, dtype=torch.float32).expand(channels)
        std_t = torch.tensor(std, dtype=torch.float32).expand(channels)
        self.model = model
        self.input_shape = model.input_shape
        self.num_classes = model.num_classes
        self.feature_dim = model.feature_dim
        self.register_buffer("scale", ((high - low) / std_t).view(1, channels, 1, 1))
        self.register_buffer("shift", ((low - mean_t) / std_t).view(1, channels, 1, 1))

    def _scaled(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs * self.scale + self.shift

    def features(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model.features(self._scaled(inputs))

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.head(features)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.model(self._scaled(inputs)))

    def features_and_logits(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.features_and_logits(self._scaled(inputs))


ARCHITECTURES: dict[str, Callable[[], SplitClassifier]] = {
    "fmnist-cnn": FashionMnistCNN,
    "preact-resnet18": PreActResNet18,
}
