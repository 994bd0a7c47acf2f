"""Fashion-MNIST in its IDX files (gzip or raw): the magic number and the length checked, the
folder from the argument, `MARGINWATCH_FASHION_MNIST_DIR`, or Debian's `dataset-fashion-mnist`."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from marginwatch.models.loaders.dataset import DataError, Dataset, Split

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# Where Debian's `dataset-fashion-mnist` package installs the IDX files.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_DIR_ENV = "MARGINWATCH_FASHION_MNIST_DIR"

_HOW_TO_GET_FASHION_MNIST = (
    "Install Debian's package (`apt-get install dataset-fashion-mnist`), or pass the folder "
    f"holding the IDX files with --data-dir or the {FASHION_MNIST_DIR_ENV} environment variable."
)
_IDX_DTYPES: dict[int, str] = {
    0x08: "u1",
    0x09: "i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (raw or gzip), checking its magic number and its length."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError as error:
        raise DataError(f"{path} does not exist. {_HOW_TO_GET_FASHION_MNIST}") from error
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as error:
            raise DataError(f"{path} is a damaged gzip file ({error}); fetch it again") from error
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file: bad magic number {raw[:4].hex() or '(empty)'}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"{path} is truncated inside its IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{path} is truncated or padded: header says shape {shape} ({expected} bytes of data), "
            f"file has {len(raw) - header} bytes"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def fashion_mnist_dir(data_dir: Path | None = None) -> Path:
    """The folder to read Fashion-MNIST from: argument, then environment, then Debian's."""
    if data_dir is not None:
        return Path(data_dir)
    from_env = os.environ.get(FASHION_MNIST_DIR_ENV)
    return Path(from_env) if from_env else DEBIAN_FASHION_MNIST_DIR


def _find_idx(folder: Path, stem: str) -> Path:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.exists():
            return candidate
    raise DataError(f"no {stem}(.gz) in {folder}. {_HOW_TO_GET_FASHION_MNIST}")


def load_fashion_mnist(split: Split, data_dir: Path | None = None) -> Dataset:
    """The full Fashion-MNIST train (60,000) or test (10,000) split from IDX files."""
    folder = fashion_mnist_dir(data_dir)
    prefix = {"train": "train", "test": "t10k"}[split]
    images = read_idx(_find_idx(folder, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find_idx(folder, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise DataError(
            f"Fashion-MNIST images must be uint8 N×28×28, got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1:
        raise DataError(f"Fashion-MNIST labels must be a vector, got shape {labels.shape}")
    return Dataset(images[:, None].copy(), labels.astype(np.int64), FASHION_MNIST_CLASSES)
