"""The served model against ONNX Runtime run directly: the flags' rule, equal to the calibration's
on its own subset (ties included), and the one output table agreeing with the arrays a prediction
really holds and with the model metadata."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from marginwatch.artifact import store
from marginwatch.artifact.flags import brittle
from marginwatch.artifact.graph import OUTPUTS, SCORE
from marginwatch.artifact.schema import ONNX_FILE
from marginwatch.calibration import margin_cache
from marginwatch.calibration.__main__ import load_config, main
from marginwatch.calibration.inputs import subset_indices
from marginwatch.calibration.metrics import nonrobust_mask
from marginwatch.calibration.threshold import (
    flag_rates,
    make_threshold_rule,
    threshold_at_tpr,
    threshold_matching_fraction,
)
from marginwatch.models.data import Dataset, save_npz
from marginwatch.models.export import onnx_session, run_batched
from marginwatch.service.engine import SERVED_OUTPUTS, EngineOptions, ServedModel
from marginwatch.service.routes_v2 import DTYPES

if TYPE_CHECKING:
    from conftest import VersionFactory


@pytest.fixture(scope="module")
def model(
    tmp_path_factory: pytest.TempPathFactory,
    new_version: VersionFactory,
    onnx_path: Path,
    images: np.ndarray,
) -> ServedModel:
    store = tmp_path_factory.mktemp("engine")
    folder = new_version(store, "fmnist", "v1", onnx=onnx_path, images=images, guard_band=0.05)
    served = ServedModel("fmnist", folder, EngineOptions(intra_op_threads=1))
    served.load()
    return served


def test_predict_flags_follow_the_threshold_and_guard_band(
    model: ServedModel, images: np.ndarray, reference: tuple[np.ndarray, np.ndarray]
) -> None:
    logits, scores = reference
    prediction = model.predict(images[:64])
    record = model.record
    np.testing.assert_allclose(prediction.scores, scores[:64], atol=record.guard_band)
    assert (prediction.labels == logits[:64].argmax(1)).all()
    exact = prediction.scores.astype(np.float64)  # λ is a float64: compared unrounded
    assert (prediction.brittle == (exact < record.threshold)).all()
    near = np.abs(exact - record.threshold) <= record.guard_band
    assert (prediction.borderline == near).all()
    assert prediction.brittle.any() and not prediction.brittle.all()


def test_output_table_matches_predictions_and_metadata(
    model: ServedModel, images: np.ndarray
) -> None:
    prediction = model.predict(images[:3])
    classes = len(model.record.class_names)
    for output in SERVED_OUTPUTS:
        array = getattr(prediction, output.field)
        assert array.dtype == DTYPES[output.datatype].newbyteorder("="), output.name
        assert list(array.shape) == [3 if dim == -1 else dim for dim in output.shape(classes)]
    metadata = model.metadata()
    assert [(o.name, o.datatype, o.shape) for o in metadata.outputs] == [
        (o.name, o.datatype, o.shape(classes)) for o in SERVED_OUTPUTS
    ]
    assert set(OUTPUTS) <= {o.name for o in SERVED_OUTPUTS}  # the graph's own outputs are served
    assert len({o.name for o in SERVED_OUTPUTS}) == len(SERVED_OUTPUTS)


def served(folder: Path) -> ServedModel:
    model = ServedModel(folder.parent.name, folder, EngineOptions(intra_op_threads=1))
    model.load()
    return model


def test_served_flags_equal_the_threshold_rules_at_ties(
    tmp_path: Path, model: ServedModel, new_version: VersionFactory, onnx_path: Path,
    images: np.ndarray,
) -> None:  # fmt: skip
    """λs where a ≤ or a λ rounded to the scores' float32 would flip a point: a λ equal to a
    served score (that point is not brittle), the λ the rule fits to flag every point (the
    float64 just above the largest score), and the rules' midpoints."""
    batch = images[:40]
    scores = model.predict(batch).scores
    order = np.argsort(scores)
    k = next(k for k in range(12, 40) if scores[order[k - 1]] < scores[order[k]])
    lowest_k = np.isin(np.arange(40), order[:k])
    tied = int(order[20])
    cases = {
        "tie": (float(scores[tied]), lowest_k),
        "every": (threshold_matching_fraction(scores, np.ones(40, bool)), np.ones(40, bool)),
        "lowest-k": (threshold_matching_fraction(scores, lowest_k), lowest_k),
        "tpr": (threshold_at_tpr(scores, lowest_k, 0.5), lowest_k),
    }
    for name, (threshold, nonrobust) in cases.items():
        folder = new_version(tmp_path, "fmnist", name, onnx=onnx_path, threshold=threshold)
        prediction = served(folder).predict(batch)
        np.testing.assert_array_equal(prediction.scores, scores)
        calibration = flag_rates(scores, nonrobust, threshold)
        assert prediction.brittle.sum() == round(calibration["flagged_fraction"] * 40), name
        hits = round(calibration["tpr"] * nonrobust.sum())
        assert (prediction.brittle & nonrobust).sum() == hits, name
        np.testing.assert_array_equal(prediction.brittle, scores.astype(np.float64) < threshold)
    assert not served(tmp_path / "fmnist" / "tie").predict(batch).brittle[tied]
    assert served(tmp_path / "fmnist" / "every").predict(batch).brittle.all()
    assert served(tmp_path / "fmnist" / "lowest-k").predict(batch).brittle.sum() == k


@pytest.mark.slow
def test_served_flags_equal_the_calibrations_on_its_subset(
    tmp_path: Path, fashion_subset: Dataset
) -> None:
    """A real calibration, then its published version served: on the subset λ was fitted on,
    the service flags what the calibration's rule and figures say."""
    data = fashion_subset.subset(np.arange(200))
    save_npz(data, tmp_path / "data.npz")
    argv = ["--store", str(tmp_path / "store"), "--dataset", str(tmp_path / "data.npz"),
            "--subset-size", "40", "--seed", "0", "--pseudo-margin", "never", "--quiet",
            "--attack", "fmn:5", "--attack", "fab:3", "--bootstrap", "20"]  # fmt: skip
    assert main(argv) == 0
    config, _ = load_config(argv)
    folder = store.current_dir(config.store, config.resolved_model_name)
    record = store.read_record(folder)
    subset = subset_indices(40, 200, 0)
    images = data.float_images[subset]
    # the subset's scores as the job takes them (models.export.verify_export: batches of 64)
    scores = run_batched(onnx_session(folder / ONNX_FILE), images, SCORE, 64)
    (cache,) = (folder.parent / ".margins").iterdir()
    margins = margin_cache.load_chunks(cache, 40, config.attack_plan)
    nonrobust = nonrobust_mask(margins.radius, margins.success, record.threat_model.eps)
    assert make_threshold_rule(record.threshold_rule)(scores, nonrobust) == record.threshold
    prediction = served(folder).predict(images)
    np.testing.assert_array_equal(prediction.scores, scores)
    np.testing.assert_array_equal(prediction.brittle, brittle(scores, record.threshold))
    rates = flag_rates(scores, nonrobust, record.threshold)
    assert prediction.brittle.sum() == round(rates["flagged_fraction"] * 40)
    assert (prediction.brittle & nonrobust).sum() == round(rates["tpr"] * nonrobust.sum())
    kept = (prediction.labels == data.labels[subset]) & ~nonrobust
    assert record.precision_not_brittle == pytest.approx(kept[~prediction.brittle].mean())
