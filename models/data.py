"""Dataset loaders: Fashion-MNIST IDX files, CIFAR-10 python batches, and `.npz` archives.

Every loader returns a `Dataset` of uint8 images in N×C×H×W layout and int64 labels; conversion
to floats in [0, 1] happens once, in `Dataset.float_images`, so no loader can disagree about scale.
Missing or malformed files raise `DataError` with a message that says what is wrong and how to
get the data.
"""

from __future__ import annotations

import gzip
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np

Split = Literal["train", "test"]

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

# Where Debian's `dataset-fashion-mnist` package installs the IDX files.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_DIR_ENV = "MARGINWATCH_FASHION_MNIST_DIR"
SHIPPED_SUBSET = Path(__file__).parent / "datasets" / "fashion-mnist-test-subset.npz"

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
        return self.images.astype(np.float32) / 255.0

    def subset(self, indices: np.ndarray) -> Dataset:
        return Dataset(self.images[indices], self.labels[indices], self.class_names)


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


def load_npz(path: Path, class_names: tuple[str, ...] | None = None) -> Dataset:
    """An `.npz` with `images` (uint8 N×C×H×W, or N×H×W) and `labels`; `class_names` optional."""
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
    if class_names is None and "class_names" in arrays:
        class_names = tuple(str(name) for name in arrays["class_names"])
    if class_names is None:
        class_names = tuple(str(i) for i in range(int(arrays["labels"].max()) + 1))
    return Dataset(images, arrays["labels"].astype(np.int64), class_names)


def save_npz(dataset: Dataset, path: Path) -> None:
    np.savez_compressed(
        path,
        images=dataset.images,
        labels=dataset.labels,
        class_names=np.array(dataset.class_names),
    )


def stratified_indices(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """`size` indices with every class as equally represented as `size` allows, sorted."""
    if size > len(labels):
        raise DataError(f"asked for {size} samples but the split has only {len(labels)}")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    chosen: list[int] = []
    round_index = 0
    while len(chosen) < size:
        for members in per_class:
            if round_index < len(members) and len(chosen) < size:
                chosen.append(int(members[round_index]))
        round_index += 1
    return np.sort(np.array(chosen, dtype=np.int64))


DATASETS = ("fashion-mnist", "fashion-mnist-subset", "cifar10")


def load_dataset(name: str, split: Split, data_dir: Path | None = None) -> Dataset:
    """A dataset by name (see `DATASETS`) or by the path of an `.npz` file."""
    if name == "fashion-mnist":
        return load_fashion_mnist(split, data_dir)
    if name == "fashion-mnist-subset":
        if split != "test":
            raise DataError("the shipped Fashion-MNIST subset holds test images only")
        return load_npz(SHIPPED_SUBSET, FASHION_MNIST_CLASSES)
    if name == "cifar10":
        if data_dir is None:
            raise DataError("CIFAR-10 needs --data-dir: the `cifar-10-batches-py` folder")
        return load_cifar10(split, data_dir)
    if name.endswith(".npz"):
        return load_npz(Path(name))
    raise DataError(f"unknown dataset {name!r}: use one of {', '.join(DATASETS)} or an .npz path")
