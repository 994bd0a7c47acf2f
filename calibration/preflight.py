"""The checks that run before any attack, so that a setup that cannot finish is refused in
seconds rather than after the attacks (which take minutes to hours).

In order, cheapest and least intrusive first: the settings (pydantic, at construction: version
and store names among them); the data and the model load and fit each other (`inputs`: the
subset's size too, and `--pseudo-margin always` has its training points); a forward pass on the
calibration subset gives finite logits, one per class, labels not in another order than the
model's (`check_class_order`) and not every point wrong; an ONNX model's torch conversion
matches ONNX Runtime on that subset; the serving graph exports (into a temporary folder) and
matches torch on a few of its points; last, the store: writable, the lock free, the version name
not taken. Each failure raises `ConfigError` with one line (the command exits 2) and, the store
coming last, leaves nothing in it; a lock held by another run raises `store.StoreBusy` (exit
3), as it always has.
"""

from __future__ import annotations

import os
import shlex
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from marginwatch.artifact import store
from marginwatch.calibration.config import (
    MIN_PSEUDO_TRAIN_POINTS,
    CalibrationConfig,
    CalibrationError,
    ConfigError,
)
from marginwatch.calibration.inputs import Inputs, load_inputs, subset_indices
from marginwatch.calibration.score_choice import can_learn_pseudo_margin, pseudo_train_points
from marginwatch.calibration.scores import ServingGraph, export_serving_graph
from marginwatch.models.onnx_import import conversion_problems

EXPORT_PROBE_POINTS = 16  # the export is checked on these (batch 1 against 64 runs each alone)
# The class-order check: where the best permutation of the model's labels (an assignment on the
# subset's confusion matrix) gives a clean accuracy of at least ORDER_MIN_ACCURACY and at least
# ORDER_GAIN × the accuracy as labelled + ORDER_MARGIN, the labels are in another order than the
# model's. The floor keeps out weak models, whose best permutation beats the identity a little by
# chance, and two-class models near chance (0.45 against 0.55 passes, 0.3 against 0.7 does not);
# the ratio and the margin ask for a gain far beyond what fitting a permutation to the subset
# gives a model in the right order. Fashion-MNIST's folders sorted by name: 0.35 against 0.85.
ORDER_MIN_ACCURACY = 0.5
ORDER_GAIN = 1.5
ORDER_MARGIN = 0.1


@dataclass(frozen=True)
class PreflightReport:
    """What the checks found, for the one-line summary."""

    model_class: str
    input_shape: tuple[int, ...]
    num_classes: int
    subset_points: int
    subset_accuracy: float
    guard_band: float  # of the logit-margin graph: largest |Δscore| between batch 1 and 64
    seconds: float
    notes: tuple[str, ...] = ()  # what the run chose that the user did not ask for

    def summary(self) -> str:
        shape = "×".join(map(str, self.input_shape))
        return (
            f"preflight passed in {self.seconds:.1f} s: {self.model_class} on {shape} inputs, "
            f"{self.num_classes} classes; {self.subset_points} subset points forward "
            f"(clean accuracy {self.subset_accuracy:.3f}); serving graph exported and "
            f"matches torch (batch 1 vs 64: {self.guard_band:.1e}); store writable, lock free"
        )


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


@torch.no_grad()
def check_forward(
    inputs: Inputs, images: np.ndarray, labels: np.ndarray, device: torch.device
) -> np.ndarray:
    """Logits of `images` (the subset): finite, one per class, not every label wrong."""
    classes = len(inputs.data.class_names)
    try:
        logits = torch.cat(
            [
                inputs.model(torch.from_numpy(images[start : start + 100]).to(device)).cpu()
                for start in range(0, len(images), 100)
            ]
        ).numpy()
    except Exception as error:  # the user's model: any failure is a setup problem
        raise ConfigError(f"the model fails on the dataset's images: {_one_line(error)}") from error
    if logits.shape != (len(images), classes):
        raise ConfigError(
            f"the model gives logits of shape {logits.shape} for {len(images)} images; "
            f"expected one per class of the dataset's {classes}"
        )
    if not np.isfinite(logits).all():
        raise ConfigError("the model gives NaN or infinite logits on the dataset's images")
    check_class_order(logits.argmax(1), labels, inputs.data.class_names)
    if not (logits.argmax(1) == labels).any():
        raise ConfigError(
            f"the model gets all {len(images)} subset points wrong: wrong weights, classes in "
            "another order than the dataset's, or inputs it expects normalised "
            "(--input-range, --mean, --std)?"
        )
    return logits


def likely_class_order(
    predicted: np.ndarray, labels: np.ndarray, names: tuple[str, ...]
) -> tuple[tuple[str, ...], float, float]:
    """The class order under which the model's predictions agree best with the labels, and the
    subset's clean accuracy under the labels' own order and under that one.

    An assignment problem on the confusion matrix (rows: the dataset's labels, columns: the
    model's): the permutation of the model's labels with the most points on its diagonal. A
    bonus below one point on the diagonal keeps, among equally good orders, the classes where
    they are (those absent from the subset above all)."""
    classes = len(names)
    confusion = np.zeros((classes, classes))
    np.add.at(confusion, (labels, predicted), 1.0)
    rows, columns = linear_sum_assignment(
        confusion + np.eye(classes) / (2 * classes), maximize=True
    )
    order = [""] * classes
    for row, column in zip(rows, columns, strict=True):
        order[column] = names[row]  # the model's label `column` is the dataset's class `row`
    total = max(len(labels), 1)
    return tuple(order), np.trace(confusion) / total, confusion[rows, columns].sum() / total


def check_class_order(predicted: np.ndarray, labels: np.ndarray, names: tuple[str, ...]) -> None:
    """Refuse a subset whose labels look permuted against the model's: see `ORDER_*`."""
    order, identity, best = likely_class_order(predicted, labels, names)
    if best >= ORDER_MIN_ACCURACY and best >= ORDER_GAIN * identity + ORDER_MARGIN:
        raise ConfigError(
            f"the model's classes look ordered otherwise than the dataset's: clean accuracy "
            f"{identity:.3f} on the subset as labelled, {best:.3f} with the classes in the order "
            f"--class-names {shlex.quote(','.join(order))}"
        )


def check_export(inputs: Inputs, images: np.ndarray, device: torch.device) -> float:
    """Export the serving graph (logit-margin score) into memory and verify it
    as the job will: ONNX Runtime against torch, batch 1 against 64. Returns the guard band."""
    graph = ServingGraph(inputs.model)
    try:
        _, _, band = export_serving_graph(graph, inputs.model.input_shape, images, None)
    except CalibrationError as error:
        raise ConfigError(f"the serving graph does not match torch: {error}") from error
    except OSError:
        raise  # the machine's trouble (memory, a file limit), not the setup's: exit 1
    except Exception as error:  # the exporter's and the user's model's errors alike
        raise ConfigError(f"the serving graph does not export: {_one_line(error)}") from error
    finally:
        inputs.model.to(device)  # the export moved it to the CPU
    return band


@contextmanager
def _created_folders(folder: Path, *, remove: bool) -> Iterator[None]:
    """Remove, afterwards and if `remove`, the folders on the way to `folder` that did not
    exist before (the lock file in the model's folder with them)."""
    missing = [path for path in (folder, *folder.parents) if not path.exists()]
    try:
        yield
    finally:
        if remove and missing:
            (folder / store.LOCK_FILE).unlink(missing_ok=True)
            for path in missing:  # deepest first
                try:
                    path.rmdir()
                except OSError:
                    break


def check_store(config: CalibrationConfig, *, leave_nothing: bool) -> None:
    """The model's store folder can be created and written, its lock taken, and the version
    is not published yet. `leave_nothing`: remove what this check created (preflight only;
    a run keeps the folder and takes the lock again at once)."""
    name = config.resolved_model_name
    folder = config.store / name
    if config.version is not None and (folder / config.version).exists():
        raise ConfigError(f"version {config.version!r} of {name!r} exists already in the store")
    with _created_folders(folder, remove=leave_nothing):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".preflight-") as probe:
                probe.write(b"marginwatch")
                probe.flush()
                os.fsync(probe.fileno())
            if config.shard is None:  # shards write disjoint chunks and take no lock
                with store.model_lock(config.store, name):
                    pass
        except OSError as error:
            raise ConfigError(
                f"store {config.store} is not writable for {name!r}: {error.strerror or error}"
            ) from error


def run_preflight(config: CalibrationConfig) -> tuple[Inputs, PreflightReport]:
    """Every check, in order; the loaded inputs for the run that follows."""
    started = time.monotonic()
    inputs = load_inputs(config)
    check_pseudo_margin_data(config, inputs)
    subset = subset_indices(inputs.subset_size, len(inputs.data), config.seed)
    images = inputs.data.subset(subset).float_images
    labels = inputs.data.labels[subset]
    device = config.torch_device
    logits = check_forward(inputs, images, labels, device)
    try:
        problems = conversion_problems(inputs.model, torch.from_numpy(images).to(device))
    except Exception as error:  # ONNX Runtime refusing the user's graph, say
        raise ConfigError(f"cannot check the ONNX conversion: {_one_line(error)}") from error
    if problems:
        raise ConfigError("; ".join(problems))
    band = check_export(inputs, images[:EXPORT_PROBE_POINTS], device)
    check_store(config, leave_nothing=config.preflight_only)
    report = PreflightReport(
        model_class=type(inputs.model).__name__,
        input_shape=tuple(inputs.model.input_shape),
        num_classes=len(inputs.data.class_names),
        subset_points=len(subset),
        subset_accuracy=float((logits.argmax(1) == labels).mean()),
        guard_band=band,
        seconds=time.monotonic() - started,
        notes=notes(config, inputs),
    )
    return inputs, report


def check_pseudo_margin_data(config: CalibrationConfig, inputs: Inputs) -> None:
    """`--pseudo-margin always` needs MIN_PSEUDO_TRAIN_POINTS training points (auto serves the
    logit margin without them, and the record says why)."""
    if config.pseudo_margin != "always" or can_learn_pseudo_margin(config, inputs):
        return
    points = pseudo_train_points(config, inputs)
    if inputs.train_data is not None:
        source, fix = "the train split", "more training images"
    else:
        source = f"{config.split} outside the subset of {inputs.subset_size} (no train split)"
        fix = "a train split, more images or a lower --subset-size"
    if config.pseudo_train_size < MIN_PSEUDO_TRAIN_POINTS:
        source, fix = f"--pseudo-train-size {config.pseudo_train_size}", "a larger one"
    raise ConfigError(
        f"--pseudo-margin always needs {MIN_PSEUDO_TRAIN_POINTS} attacked training points, and "
        f"{config.dataset} gives {points} ({source}): give {fix}, or use --pseudo-margin auto "
        "or never"
    )


def notes(config: CalibrationConfig, inputs: Inputs) -> tuple[str, ...]:
    """What the run does that its settings did not say, for a line each before the attacks."""
    if inputs.subset_size == config.subset_size:
        return ()
    return (
        f"{config.dataset}:{config.split} has {inputs.subset_size} images, fewer than the "
        f"default subset of {config.subset_size}: attacking all of them (--subset-size sets "
        "another size)",
    )
