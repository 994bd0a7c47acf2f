"""Small data: a dataset smaller than the default subset is attacked whole (with a note), an
explicit `--subset-size` it cannot fill is refused naming the flag, and a pseudo-margin without
`MIN_PSEUDO_TRAIN_POINTS` training points is not learned (auto: the record says why; always:
refused). A property test runs the whole job over many small datasets: it publishes, or refuses
with one line, and never ends in a traceback."""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from torch import nn

from marginwatch.artifact import store
from marginwatch.calibration.__main__ import main
from marginwatch.calibration.config import MIN_PSEUDO_TRAIN_POINTS
from marginwatch.models.data import Dataset, save_npz
from marginwatch.models.registry import save_weights

FACTORIES = "small_data_factories"
# A linear model per class count; the test gives it nearest-class-mean weights (`_weights`).
FACTORY_SOURCE = """from torch import nn
def _linear(classes):
    return lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, classes))
for _classes in range(2, 11):
    globals()[f"linear{_classes}"] = _linear(_classes)
"""
TINY = ["--attack", "fmn:5", "--attack", "fab:3", "--bootstrap", "20", "--name", "tiny",
        "--pseudo-train-size", "60", "--pseudo-epochs", "5", "--pseudo-hidden", "8",
        "--version", "v1"]  # fmt: skip
DEFAULT_SUBSET = 500


@pytest.fixture(scope="module")
def factories(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("factories")
    (folder / f"{FACTORIES}.py").write_text(FACTORY_SOURCE)
    sys.path.insert(0, str(folder))
    try:
        yield FACTORIES
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop(FACTORIES, None)


@dataclass(frozen=True)
class Layout:
    """One small dataset and how the job is asked to calibrate on it."""

    classes: int
    form: str  # folder (one split, or train/ and test/), npz, npz-unnamed (names by flag)
    test: int  # images of the calibrated split
    train: int | None  # images of a train split (folders only)
    subset: int | None  # --subset-size, when given
    pseudo: str
    seed: int

    @property
    def subset_used(self) -> int:
        return self.subset if self.subset is not None else min(DEFAULT_SUBSET, self.test)

    @property
    def training_points(self) -> int:
        """The pseudo-margin's training points: the train split's, else the rest of the split
        (--pseudo-train-size 60 at most)."""
        pool = self.train if self.train is not None else self.test - self.subset_used
        return min(60, pool)


@st.composite
def layouts(draw: st.DrawFn) -> Layout:
    classes = draw(st.integers(2, 10))
    form = draw(st.sampled_from(["folder", "npz", "npz-unnamed"]))
    two_splits = form == "folder" and draw(st.booleans())
    test = draw(st.integers(classes if form == "folder" else 2, 1000))
    return Layout(
        classes=classes,
        form=form,
        test=test,
        train=draw(st.integers(classes, 1000)) if two_splits else None,
        subset=draw(st.none() | st.integers(2, 1200)),
        pseudo=draw(st.sampled_from(["auto", "always", "never"])),
        seed=draw(st.integers(0, 2**16)),
    )


def _draw(source: Dataset, classes: int, size: int, rng: np.random.Generator) -> Dataset:
    """`size` shipped images of the first `classes` classes, every class at least once where
    `size` allows, the rest at random."""
    labels = np.concatenate([np.arange(min(classes, size)), rng.integers(0, classes, size)])[:size]
    chosen = [rng.choice(np.flatnonzero(source.labels == label)) for label in labels]
    names = tuple(f"c{label}" for label in range(classes))
    return Dataset(source.images[chosen], labels.astype(np.int64), names)


def _write_folder(data: Dataset, folder: Path) -> None:
    for label, name in enumerate(data.class_names):
        (folder / name).mkdir(parents=True)
        for index in np.flatnonzero(data.labels == label):
            Image.fromarray(data.images[index, 0]).save(folder / name / f"{index}.png")


def _weights(data: Dataset, path: Path) -> None:
    """Nearest-class-mean weights, scaled to logits of a trained network's size (a few units):
    a model that fits any class count and gets most of its own data right."""
    flat = data.float_images.reshape(len(data), -1)
    means = np.stack(
        [
            flat[data.labels == label].mean(0) if (data.labels == label).any() else np.zeros(784)
            for label in range(len(data.class_names))
        ]
    )
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, len(means)))
    with torch.no_grad():
        model[1].weight.copy_(torch.from_numpy(means / 4))
        model[1].bias.copy_(torch.from_numpy(-(means**2).sum(1) / 8))
    save_weights(model, path)


def _dataset_args(layout: Layout, source: Dataset, root: Path) -> list[str]:
    """Write the layout's data under `root` and return the job's model and data flags."""
    rng = np.random.default_rng(layout.seed)
    test = _draw(source, layout.classes, layout.test, rng)
    _weights(test, root / "weights.safetensors")
    model = ["--model", f"{FACTORIES}:linear{layout.classes}",
             "--weights", str(root / "weights.safetensors")]  # fmt: skip
    if layout.form == "folder":
        if layout.train is None:
            _write_folder(test, root / "images")
        else:
            _write_folder(test, root / "images" / "test")
            _write_folder(
                _draw(source, layout.classes, layout.train, rng), root / "images" / "train"
            )
        return [*model, "--dataset", str(root / "images")]
    if layout.form == "npz":
        save_npz(test, root / "data.npz")
        return [*model, "--dataset", str(root / "data.npz")]
    np.savez(root / "data.npz", images=test.images, labels=test.labels)
    return [
        *model,
        "--dataset",
        str(root / "data.npz"),
        "--class-names",
        ",".join(test.class_names),
    ]


def _check_published(layout: Layout, root: Path) -> None:
    assert store.current_version(root / "store", "tiny") == "v1"
    record = store.read_record(root / "store" / "tiny" / "v1")
    assert record.subset.size == layout.subset_used
    assert record.class_names == [f"c{label}" for label in range(layout.classes)]
    facts = record.pseudo_margin
    if layout.pseudo == "never":
        assert facts is None
    elif layout.training_points < MIN_PSEUDO_TRAIN_POINTS:
        assert facts is not None and facts.choice is not None
        assert record.score_kind == "logit-margin" and not facts.chosen
        assert facts.train_points == layout.training_points
        assert facts.choice.reason.startswith("no pseudo-margin learned")
    else:
        assert facts is not None and facts.train_points == layout.training_points


@pytest.mark.slow
@settings(
    max_examples=12,
    derandomize=True,  # the same datasets on every run: no flaky failures in `make test`
    database=None,
    deadline=None,  # the machine is shared: time is not a property here
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(layout=layouts())
def test_any_small_dataset_publishes_or_is_refused_in_one_line(
    layout: Layout,
    factories: str,
    fashion_subset: Dataset,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        args = _dataset_args(layout, fashion_subset, root)
        capsys.readouterr()
        if layout.subset is not None:
            args += ["--subset-size", str(layout.subset)]
        code = main([*args, "--store", str(root / "store"), "--seed", str(layout.seed),
                     "--pseudo-margin", layout.pseudo, "--quiet", *TINY])  # fmt: skip
        err = capsys.readouterr().err
        assert "Traceback" not in err
        if layout.subset is not None and layout.subset > layout.test:
            assert code == 2 and f"--subset-size {layout.subset}" in err, err
            assert f"has only {layout.test} images" in err
        elif layout.pseudo == "always" and layout.training_points < MIN_PSEUDO_TRAIN_POINTS:
            assert code == 2 and f"--pseudo-margin always needs {MIN_PSEUDO_TRAIN_POINTS}" in err, (
                err
            )
        assert code in (0, 2), err
        if code == 2:
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("marginwatch-calibrate: "), err
        else:
            _check_published(layout, root)


@pytest.fixture(scope="module")
def fifty(tmp_path_factory: pytest.TempPathFactory, fashion_subset: Dataset) -> Path:
    """50 shipped images, 5 of each class, in one `.npz`: one split, no train split."""
    path = tmp_path_factory.mktemp("fifty") / "fifty.npz"
    save_npz(fashion_subset.subset(np.arange(0, 2000, 40)), path)
    return path


def test_fewer_images_than_the_default_subset_are_attacked_whole_with_a_note(
    tmp_path: Path, fifty: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--dataset", str(fifty), "--store", str(tmp_path), "--preflight-only"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert captured.err == (
        f"marginwatch-calibrate: note: {fifty}:test has 50 images, fewer than the default subset "
        "of 500: attacking all of them (--subset-size sets another size)\n"
    )
    assert "; 50 subset points forward" in captured.out
    assert main([*args, "--quiet"]) == 0
    assert capsys.readouterr().err == ""  # --quiet: no note
    assert main([*args, "--subset-size", "30"]) == 0  # a size it holds: no note
    captured = capsys.readouterr()
    assert captured.err == "" and "; 30 subset points forward" in captured.out


@pytest.mark.slow
def test_auto_without_training_points_serves_the_logit_margin_and_says_why(
    tmp_path: Path, fifty: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The subset takes the whole one-split dataset: no point is left to train on (the job used
    to end in `torch.cat(): expected a non-empty list of Tensors`)."""
    args = ["--dataset", str(fifty), "--store", str(tmp_path), "--attack", "fmn:5",
            "--attack", "fab:3", "--bootstrap", "20", "--quiet", "--version", "v1"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    record = store.read_record(tmp_path / "fmnist-cnn-pgd" / "v1")
    assert record.score_kind == "logit-margin" and record.subset.size == 50
    facts = record.pseudo_margin
    assert facts is not None and facts.choice is not None and not facts.chosen
    assert facts.train_points == 0 and facts.pseudo_margin_tau is None
    assert facts.choice.chosen == "logit-margin" and facts.logit_margin_tau == pytest.approx(
        record.kendall_tau, abs=0.01
    )
    reason = facts.choice.reason
    assert reason.startswith(f"no pseudo-margin learned: 0 training points, fewer than the "
                             f"{MIN_PSEUDO_TRAIN_POINTS} it needs")  # fmt: skip
    assert f"score choice     logit-margin: {reason}" in out
