"""The datasets' one entry point: `load_dataset` picks a loader by name, `.npz` path or image folder
(the loaders live in `models/loaders/`, one module per source), renumbers labels to a model's class
order (`in_class_order`), and draws stratified subsets.

Every loader returns a `Dataset` of uint8 images in N×C×H×W layout and int64 labels; missing or
malformed files raise `DataError` with a message that says what is wrong and how to get the data.
The names other code imports from here (`Dataset`, `DataError`, the loaders, `save_npz`, the class
names) are re-exported from their modules.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from marginwatch.artifact.pixels import unit_floats
from marginwatch.models.loaders.cifar import CIFAR10_CLASSES, load_cifar10
from marginwatch.models.loaders.dataset import DataError, Dataset, Split
from marginwatch.models.loaders.idx import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR_ENV,
    fashion_mnist_dir,
    load_fashion_mnist,
    read_idx,
)
from marginwatch.models.loaders.image_folder import image_split_folder, load_image_folder
from marginwatch.models.loaders.npz import digit_names, load_npz, read_npz, save_npz

__all__ = [
    "CIFAR10_CLASSES",
    "DATASETS",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR_ENV",
    "SHIPPED_SUBSET",
    "DataError",
    "Dataset",
    "Split",
    "fashion_mnist_dir",
    "has_train_split",
    "image_split_folder",
    "in_class_order",
    "load_cifar10",
    "load_dataset",
    "load_fashion_mnist",
    "load_image_folder",
    "load_npz",
    "read_idx",
    "save_npz",
    "stratified_indices",
    "unit_floats",
]

SHIPPED_SUBSET = Path(__file__).parent / "datasets" / "fashion-mnist-test-subset.npz"


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


def load_dataset(
    name: str,
    split: Split,
    data_dir: Path | None = None,
    *,
    class_names: Sequence[str] | None = None,
) -> Dataset:
    """A dataset by name (see `DATASETS`), by the path of an `.npz` file, or by the path of an
    image folder (`load_image_folder`). Names win: write `./cifar10` for a folder of that name.

    `class_names` is the model's label order: label i is the class named i-th. Where the data
    names its classes (the named datasets, an image folder's class folders, an `.npz` with
    `class_names`), it must name each of them once, and the labels are renumbered to it; an
    `.npz` without names takes them as its names."""
    if name.endswith(".npz") and not Path(name).is_dir():
        images, labels, stored = read_npz(Path(name))
        if stored is None and class_names is not None:
            return _named(images, labels, tuple(class_names), name)
        data = Dataset(images, labels, stored or digit_names(labels))
    else:
        data = _load_named_classes(name, split, data_dir)
    return data if class_names is None else in_class_order(data, tuple(class_names), name)


def _load_named_classes(name: str, split: Split, data_dir: Path | None) -> Dataset:
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
    if Path(name).is_dir():
        return load_image_folder(Path(name), split)
    raise DataError(
        f"unknown dataset {name!r}: use one of {', '.join(DATASETS)}, an .npz path, or an "
        "existing image folder (one sub-folder per class)"
    )


def has_train_split(name: str) -> bool:
    """Whether `name` holds a training split apart from its test split. An `.npz` is one file,
    which `load_dataset` answers for either split (so `marginwatch-train` can train on it); the
    shipped subset and an image folder without `train/` refuse `train` themselves."""
    return not (name.endswith(".npz") and not Path(name).is_dir())


def _named(images: np.ndarray, labels: np.ndarray, names: tuple[str, ...], source: str) -> Dataset:
    """Unnamed labels given names: enough of them for the largest label."""
    needed = int(labels.max()) + 1 if labels.size else 0
    if len(names) < needed:
        raise DataError(
            f"--class-names gives {len(names)} names, but the labels of {source} run to "
            f"{needed - 1}: give at least {needed}, in label order"
        )
    return Dataset(images, labels, names)


def in_class_order(data: Dataset, order: tuple[str, ...], source: str) -> Dataset:
    """`data` with its labels renumbered so that label i is the class named `order[i]`; `order`
    must name each of its classes once (an image folder's: each class folder)."""
    names = data.class_names
    listed = f"{len(names)} classes of {source} ({', '.join(names)})"
    if len(order) != len(names):
        raise DataError(
            f"--class-names gives {len(order)} names, but there are {len(names)}: name each "
            f"of the {listed} once, in the model's label order"
        )
    missing = [name for name in names if name not in order]
    unknown = [name for name in order if name not in names]
    if missing or unknown or len(set(order)) != len(order):
        problems = [f"not named: {', '.join(missing)}"] if missing else []
        problems += [f"unknown: {', '.join(unknown)}"] if unknown else []
        raise DataError(
            f"--class-names must name each of the {listed} once, in the model's label order"
            + (f" ({'; '.join(problems)})" if problems else " (a name repeats)")
        )
    renumber = np.array([order.index(name) for name in names], dtype=np.int64)
    return Dataset(data.images, renumber[data.labels], order)
