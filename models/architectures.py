"""Classifier architectures, each split into `features(x)` and `head(features)`.

The split is what the pseudo-margin needs (it reads penultimate features) and what the ONNX
export exposes as a second output. Every model takes float32 inputs in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable

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


class LogitsAsFeatures(SplitClassifier):
    """Adapts a plain classifier (say, a TorchScript file) that has no features/head split:
    its logits serve as features and the head is the identity."""

    def __init__(
        self, module: nn.Module, input_shape: tuple[int, int, int], num_classes: int
    ) -> None:
        super().__init__()
        self.module = module
        self.input_shape = input_shape
        self.num_classes = num_classes
        self.feature_dim = num_classes

    def features(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.module(inputs)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return features


ARCHITECTURES: dict[str, Callable[[], SplitClassifier]] = {
    "fmnist-cnn": FashionMnistCNN,
    "preact-resnet18": PreActResNet18,
}
