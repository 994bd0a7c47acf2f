"""`.npz` archives: `images` (uint8 N×C×H×W, or N×H×W), `labels` and, optionally,
`class_names`; read without pickles."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from marginwatch.models.loaders.dataset import DataError, Dataset


def load_npz(path: Path, class_names: tuple[str, ...] | None = None) -> Dataset:
    """An `.npz` with `images` (uint8 N×C×H×W, or N×H×W) and `labels`; `class_names` optional
    (`class_names` given here replace the archive's; without either, the labels' digits)."""
    images, labels, stored = read_npz(path)
    return Dataset(images, labels, class_names or stored or digit_names(labels))


def digit_names(labels: np.ndarray) -> tuple[str, ...]:
    """Class names for unnamed labels: "0", "1", ... up to the largest label."""
    return tuple(str(i) for i in range(int(labels.max()) + 1 if labels.size else 0))


def read_npz(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[str, ...] | None]:
    """Images (N×C×H×W), labels and, when the archive has them, its class names."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except FileNotFoundError as error:
        raise DataError(f"{path} does not exist") from error
    except (ValueError, OSError) as error:
        raise DataError(f"{path} is not a readable .npz archive: {error}") from error
    missing = {"images", "labels"} - arrays.keys()
    if missing:
        raise DataError(f"{path} lacks the arrays {sorted(missing)} (has {sorted(arrays)})")
    images = arrays["images"]
    if images.dtype != np.uint8:
        raise DataError(f"{path}: images must be uint8 in [0, 255], got {images.dtype}")
    if images.ndim == 3:
        images = images[:, None]
    names = None
    if "class_names" in arrays:
        names = tuple(str(name) for name in arrays["class_names"])
    return images, arrays["labels"].astype(np.int64), names


def save_npz(dataset: Dataset, path: Path) -> None:
    np.savez_compressed(
        path,
        images=dataset.images,
        labels=dataset.labels,
        class_names=np.array(dataset.class_names),
    )
