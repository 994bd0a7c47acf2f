"""The served model against ONNX Runtime run directly: the flags' rule, and the one output table
agreeing with the arrays a prediction really holds and with the model metadata."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from marginwatch.artifact.graph import OUTPUTS
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
    assert (prediction.brittle == (prediction.scores < record.threshold)).all()
    near = np.abs(prediction.scores - record.threshold) <= record.guard_band
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
