"""CIFAR-10 in its python format (`data_batch_1..5`, `test_batch`): pickles, unpickled with an
allow-list of what rebuilds numpy arrays, nothing executable."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import ClassVar

import numpy as np

from marginwatch.models.loaders.dataset import DataError, Dataset, Split

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """CIFAR-10 batches are pickles; allow only what rebuilds numpy arrays, nothing executable."""

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    }

    def find_class(self, module: str, name: str) -> type:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as handle:
            batch = _ArrayOnlyUnpickler(handle, encoding="bytes").load()
    except FileNotFoundError as error:
        raise DataError(
            f"{path} does not exist: pass the `cifar-10-batches-py` folder with --data-dir"
        ) from error
    except (pickle.UnpicklingError, EOFError, ValueError) as error:
        raise DataError(f"{path} is not a CIFAR-10 python batch: {error}") from error
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{path} is not a CIFAR-10 python batch: no b'data' and b'labels' keys")
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: data must be N×3072 uint8, got shape {data.shape}")
    return data.reshape(-1, 3, 32, 32), np.asarray(batch[b"labels"], dtype=np.int64)


def load_cifar10(split: Split, data_dir: Path) -> Dataset:
    """CIFAR-10 in its standard python format (`data_batch_1..5`, `test_batch`)."""
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    parts = [_read_cifar_batch(Path(data_dir) / name) for name in names]
    return Dataset(
        np.concatenate([images for images, _ in parts]),
        np.concatenate([labels for _, labels in parts]),
        CIFAR10_CLASSES,
    )
