"""Class order: `--class-names` gives the model's label order (an image folder's folders, an
unnamed `.npz`'s names, or a named dataset's names reordered), and preflight refuses a subset
whose labels look permuted against the model's, printing the order to paste."""

from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from marginwatch.artifact import store
from marginwatch.calibration.__main__ import load_config, main
from marginwatch.calibration.config import ENV_PREFIX, ConfigError
from marginwatch.calibration.preflight import check_class_order, likely_class_order
from marginwatch.models.data import FASHION_MNIST_CLASSES, DataError, Dataset, load_dataset
from marginwatch.models.registry import load_model
from marginwatch.service.engine import EngineOptions, ServedModel

# Folder names cannot hold '/': "T-shirt/top" becomes "T-shirt-top". Sorted, they are in another
# order than the model's labels (Ankle boot, Bag, Coat, ...).
FOLDERS = tuple(name.replace("/", "-") for name in FASHION_MNIST_CLASSES)
FAST = ["--attack", "fmn:5", "--attack", "fab:3", "--bootstrap", "20", "--quiet",
        "--pseudo-margin", "never", "--version", "v1"]  # fmt: skip


def _image_folder(data: Dataset, root: Path, per_class: int, names: tuple[str, ...]) -> Path:
    for label, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for index in np.flatnonzero(data.labels == label)[:per_class]:
            Image.fromarray(data.images[index, 0]).save(root / name / f"{index}.png")
    return root


@pytest.fixture(scope="module")
def named_folders(tmp_path_factory: pytest.TempPathFactory, fashion_subset: Dataset) -> Path:
    """6 images of each Fashion-MNIST class, in folders named after the classes."""
    return _image_folder(fashion_subset, tmp_path_factory.mktemp("named"), 6, FOLDERS)


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("marginwatch-calibrate: "), err
    return lines[0]


@pytest.mark.slow
def test_folders_in_another_order_are_refused_then_served_with_the_suggested_order(
    tmp_path: Path,
    named_folders: Path,
    fashion_subset: Dataset,
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["--dataset", str(named_folders), "--store", str(tmp_path), *FAST]
    assert main(args) == 2
    line = _one_line(capsys.readouterr().err)
    assert "look ordered otherwise than the dataset's" in line
    suggested = shlex.split(line.split("--class-names ", 1)[1])[0]
    assert suggested == ",".join(FOLDERS)  # the model's own order, ready to paste
    assert store.current_version(tmp_path, "fmnist-cnn-pgd") is None

    assert main([*args, "--class-names", suggested]) == 0
    served = ServedModel("fmnist-cnn-pgd", tmp_path / "fmnist-cnn-pgd" / "v1", EngineOptions(1))
    served.load()
    assert served.record.class_names == list(FOLDERS)
    images = fashion_subset.float_images[::100]
    with torch.no_grad():
        expected = load_model("fmnist-cnn-pgd")(torch.from_numpy(images)).argmax(1).numpy()
    prediction = served.predict(images)
    # the name served for each prediction is the class the shipped model means
    served_names = [served.record.class_names[label] for label in prediction.labels]
    assert served_names == [FOLDERS[label] for label in expected]
    # and, the model being good, mostly the folder the image came from
    truth = [FOLDERS[label] for label in fashion_subset.labels[::100]]
    assert np.mean([a == b for a, b in zip(served_names, truth, strict=True)]) > 0.7


def test_class_names_reorder_an_image_folder(tmp_path: Path, fashion_subset: Dataset) -> None:
    root = _image_folder(fashion_subset, tmp_path, 2, ("b", "a", "c"))  # labels 0, 1, 2 there
    sorted_order = load_dataset(str(root), "test")
    assert sorted_order.class_names == ("a", "b", "c")
    ordered = load_dataset(str(root), "test", class_names=["b", "a", "c"])
    assert ordered.class_names == ("b", "a", "c")
    np.testing.assert_array_equal(ordered.images, sorted_order.images)
    # the images of folder b (first in `ordered`'s order) are label 0 there, label 1 sorted
    np.testing.assert_array_equal(sorted_order.labels[ordered.labels == 0], [1, 1])
    with pytest.raises(
        DataError, match=r"name each of the 3 classes .* \(not named: c; unknown: d\)"
    ):
        load_dataset(str(root), "test", class_names=["b", "a", "d"])
    with pytest.raises(DataError, match="gives 2 names, but there are 3"):
        load_dataset(str(root), "test", class_names=["b", "a"])


def test_class_names_name_an_unnamed_npz(tmp_path: Path) -> None:
    images = np.zeros((4, 1, 5, 5), np.uint8)
    np.savez(tmp_path / "plain.npz", images=images, labels=np.array([0, 1, 2, 1]))
    assert load_dataset(str(tmp_path / "plain.npz"), "test").class_names == ("0", "1", "2")
    named = load_dataset(str(tmp_path / "plain.npz"), "test", class_names=["x", "y", "z"])
    assert named.class_names == ("x", "y", "z")
    np.testing.assert_array_equal(named.labels, [0, 1, 2, 1])  # names given, labels kept
    with pytest.raises(DataError, match=r"labels of .* run to 2: give at least 3"):
        load_dataset(str(tmp_path / "plain.npz"), "test", class_names=["x", "y"])
    np.savez(tmp_path / "named.npz", images=images, labels=np.array([0, 1, 2, 1]),
             class_names=np.array(["x", "y", "z"]))  # fmt: skip
    reordered = load_dataset(str(tmp_path / "named.npz"), "test", class_names=["z", "x", "y"])
    np.testing.assert_array_equal(reordered.labels, [1, 2, 0, 2])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--class-names", "a,b"], "--class-names gives 2 names, but there are 10"),
        (["--class-names", "a,b,a"], "--class-names: each class is named once; repeated: a"),
        (["--class-names", "a,,b"], "--class-names: class names must not be empty"),
    ],
)
def test_bad_class_names_exit_2_with_one_line(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--dataset", "fashion-mnist-subset", "--store", str(tmp_path), "--preflight-only"]
    assert main([*args, *argv]) == 2
    assert message in _one_line(capsys.readouterr().err)


def test_class_names_from_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(f"{ENV_PREFIX}CLASS_NAMES", "Ankle boot, Bag,Coat")
    config, _ = load_config([])
    assert config.class_names == ("Ankle boot", "Bag", "Coat")
    config, _ = load_config(["--class-names", "x,y"])  # the flag wins
    assert config.class_names == ("x", "y")


def test_likely_order_is_found_on_a_permuted_confusion() -> None:
    names = ("a", "b", "c", "d")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 200)
    truth = np.array([2, 0, 3, 1])  # the model's label of each dataset class
    predicted = np.where(rng.random(200) < 0.9, truth[labels], rng.integers(0, 4, 200))
    order, identity, best = likely_class_order(predicted, labels, names)
    assert order == ("b", "d", "a", "c")  # the model's label j is the class named order[j]
    assert identity < 0.2 and best > 0.85
    with pytest.raises(ConfigError, match=r"--class-names b,d,a,c$"):
        check_class_order(predicted, labels, names)


@pytest.mark.parametrize(("right", "refused"), [(0.45, False), (0.4, False), (0.3, True)])
def test_two_classes_near_chance_are_called_permuted_only_when_far_below(
    right: float, refused: bool
) -> None:
    """A fraction `right` of the points right as labelled, the others right with the two labels
    swapped: 0.4 against 0.6 is noise, 0.3 against 0.7 is an order."""
    labels = np.repeat([0, 1], 100)
    predicted = np.where(np.arange(200) % 100 < right * 100, labels, 1 - labels)
    if refused:
        with pytest.raises(ConfigError, match=r"--class-names b,a$"):
            check_class_order(predicted, labels, ("a", "b"))
    else:
        check_class_order(predicted, labels, ("a", "b"))


def test_a_model_that_guesses_is_not_called_permuted() -> None:
    rng = np.random.default_rng(1)
    names = tuple("abcdefghij")
    check_class_order(rng.integers(0, 10, 200), rng.integers(0, 10, 200), names)
