from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from marginwatch.models import data
from marginwatch.models.data import load_dataset, stratified_indices
from marginwatch.models.loaders import cifar, dataset, idx, image_folder, npz
from marginwatch.models.loaders.cifar import load_cifar10
from marginwatch.models.loaders.dataset import DataError, Dataset
from marginwatch.models.loaders.idx import FASHION_MNIST_CLASSES, load_fashion_mnist, read_idx
from marginwatch.models.loaders.npz import load_npz, save_npz


def write_idx(path: Path, array: np.ndarray, *, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


def write_fashion_split(folder: Path, prefix: str, count: int, *, compress: bool) -> Dataset:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=count, dtype=np.uint8)
    suffix = ".gz" if compress else ""
    write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images, compress=compress)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels, compress=compress)
    return Dataset(images[:, None], labels.astype(np.int64), FASHION_MNIST_CLASSES)


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_idx_round_trip(tmp_path: Path, compress: bool) -> None:
    written = write_fashion_split(tmp_path, "t10k", 17, compress=compress)
    loaded = load_fashion_mnist("test", tmp_path)
    assert loaded.images.shape == (17, 1, 28, 28)
    np.testing.assert_array_equal(loaded.images, written.images)
    np.testing.assert_array_equal(loaded.labels, written.labels)
    assert loaded.class_names[0] == "T-shirt/top"


def test_data_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_fashion_split(tmp_path, "train", 5, compress=True)
    monkeypatch.setenv("MARGINWATCH_FASHION_MNIST_DIR", str(tmp_path))
    assert len(load_fashion_mnist("train")) == 5


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda raw: b"\x12\x34" + raw[2:], "bad magic"),
        (lambda raw: raw[:-100], "truncated"),
        (lambda raw: raw[:6], "truncated inside its IDX header"),
        (lambda raw: raw + b"\x00", "truncated or padded"),
        (lambda raw: b"", "bad magic"),
    ],
)
def test_idx_corruption_is_named(tmp_path: Path, mangle, message: str) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "images"
    write_idx(path, np.zeros((3, 28, 28), np.uint8), compress=False)
    path.write_bytes(mangle(path.read_bytes()))
    with pytest.raises(DataError, match=message):
        read_idx(path)


def test_damaged_gzip_is_named(tmp_path: Path) -> None:
    path = tmp_path / "images.gz"
    write_idx(path, np.zeros((3, 28, 28), np.uint8), compress=True)
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(DataError, match="damaged gzip"):
        read_idx(path)


def test_missing_data_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("test", tmp_path)


def test_wrong_image_shape_is_rejected(tmp_path: Path) -> None:
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((4, 32, 32), np.uint8), compress=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(4, np.uint8), compress=False)
    with pytest.raises(DataError, match="N×28×28"):
        load_fashion_mnist("test", tmp_path)


def test_image_label_count_mismatch(tmp_path: Path) -> None:
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((4, 28, 28), np.uint8), compress=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(3, np.uint8), compress=False)
    with pytest.raises(DataError, match="4 images but 3 labels"):
        load_fashion_mnist("test", tmp_path)


def write_cifar_batch(path: Path, count: int, seed: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(count, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, size=count)]
    with path.open("wb") as handle:
        pickle.dump({b"batch_label": b"x", b"labels": labels, b"data": data}, handle, protocol=2)
    return data, labels


def test_cifar10_python_batches(tmp_path: Path) -> None:
    written = [write_cifar_batch(tmp_path / f"data_batch_{i}", 3, i) for i in range(1, 6)]
    test_data, test_labels = write_cifar_batch(tmp_path / "test_batch", 4, 9)
    train = load_cifar10("train", tmp_path)
    assert train.images.shape == (15, 3, 32, 32)
    np.testing.assert_array_equal(train.images[3].reshape(-1), written[1][0][0])
    test = load_cifar10("test", tmp_path)
    np.testing.assert_array_equal(test.labels, test_labels)
    # the standard layout: 1024 red values, then green, then blue, row-major
    assert test.images[0, 1, 0, 0] == test_data[0, 1024]
    assert test.class_names[3] == "cat"


def test_cifar_loader_refuses_code_in_pickles(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (print, ("executed",))

    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(DataError, match=r"refusing to load builtins\.print"):
        load_cifar10("test", tmp_path)


def test_cifar_missing_batch(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        load_cifar10("test", tmp_path)


def test_npz_round_trip_and_errors(tmp_path: Path) -> None:
    dataset = Dataset(np.zeros((6, 1, 5, 5), np.uint8), np.arange(6) % 3, ("a", "b", "c"))
    save_npz(dataset, tmp_path / "d.npz")
    loaded = load_dataset(str(tmp_path / "d.npz"), "test")
    assert loaded.class_names == ("a", "b", "c")
    np.testing.assert_array_equal(loaded.labels, dataset.labels)
    np.savez(tmp_path / "bad.npz", images=np.zeros((2, 5, 5), np.float32), labels=np.zeros(2))
    with pytest.raises(DataError, match="must be uint8"):
        load_npz(tmp_path / "bad.npz")
    np.savez(tmp_path / "nolabels.npz", images=np.zeros((2, 5, 5), np.uint8))
    with pytest.raises(DataError, match=r"lacks the arrays \['labels'\]"):
        load_npz(tmp_path / "nolabels.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable"):
        load_npz(tmp_path / "junk.npz")


def test_unknown_dataset_name() -> None:
    with pytest.raises(DataError, match="unknown dataset 'mnist'"):
        load_dataset("mnist", "test")


def test_shipped_subset_is_stratified(fashion_subset: Dataset) -> None:
    assert fashion_subset.images.shape == (2000, 1, 28, 28)
    assert fashion_subset.images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(fashion_subset.labels), [200] * 10)
    assert fashion_subset.float_images.min() >= 0.0 and fashion_subset.float_images.max() <= 1.0


def test_stratified_indices() -> None:
    labels = np.repeat(np.arange(4), [10, 10, 10, 3])
    chosen = stratified_indices(labels, 20, seed=1)
    assert len(set(chosen.tolist())) == 20
    np.testing.assert_array_equal(np.bincount(labels[chosen]), [6, 6, 5, 3])
    np.testing.assert_array_equal(chosen, stratified_indices(labels, 20, seed=1))
    with pytest.raises(DataError, match="only 33"):
        stratified_indices(labels, 34, seed=1)


def test_models_data_still_names_what_it_held_before_the_loaders_split() -> None:
    """Code and users import these from `marginwatch.models.data`: the same objects as the
    loaders' own."""
    homes = {
        dataset: ("Dataset", "DataError", "Split"),
        idx: ("FASHION_MNIST_CLASSES", "FASHION_MNIST_DIR_ENV", "fashion_mnist_dir",
              "load_fashion_mnist", "read_idx"),
        cifar: ("CIFAR10_CLASSES", "load_cifar10"),
        npz: ("load_npz", "save_npz"),
        image_folder: ("image_split_folder", "load_image_folder"),
    }  # fmt: skip
    for module, names in homes.items():
        for name in names:
            assert getattr(data, name) is getattr(module, name), name
            assert name in data.__all__, name
    for own in ("DATASETS", "load_dataset", "has_train_split", "in_class_order", "SHIPPED_SUBSET"):
        assert own in data.__all__ and hasattr(data, own), own
