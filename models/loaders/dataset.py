"""What every loader returns: `Dataset`, uint8 images in N×C×H×W layout, int64 labels and the
class names; and `DataError`, the one error of every loader.

Conversion to floats in [0, 1] happens once, in `unit_floats` (`Dataset.float_images`, the pixel
rules of `artifact/pixels.py`), so no loader can disagree about scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from marginwatch.artifact.pixels import unit_floats

Split = Literal["train", "test"]


class DataError(Exception):
    """Data that is missing, truncated or not in the expected format."""


@dataclass(frozen=True)
class Dataset:
    """Images as uint8 N×C×H×W, labels as int64 N, and the class names in label order."""

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise DataError(f"images must be N×C×H×W, got shape {self.images.shape}")
        if len(self.images) != len(self.labels):
            raise DataError(
                f"{len(self.images)} images but {len(self.labels)} labels: the files do not match"
            )
        if len(self.labels) and (
            self.labels.min() < 0 or self.labels.max() >= len(self.class_names)
        ):
            raise DataError(
                f"labels must lie in [0, {len(self.class_names) - 1}], "
                f"found [{self.labels.min()}, {self.labels.max()}]"
            )

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def float_images(self) -> np.ndarray:
        """Images as float32 in [0, 1], the input range of every model here."""
        return unit_floats(self.images)

    def subset(self, indices: np.ndarray) -> Dataset:
        return Dataset(self.images[indices], self.labels[indices], self.class_names)
