from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from marginwatch.models.architectures import FashionMnistCNN
from marginwatch.models.data import Dataset, stratified_indices
from marginwatch.models.export import (
    ExportCheck,
    LogitsAndFeatures,
    export_onnx,
    main,
    onnx_session,
    verify_export,
)
from marginwatch.models.registry import SHIPPED_MODELS, load_model, save_weights


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SHIPPED_MODELS))
def test_shipped_model_export_parity_and_batch_invariance(
    name: str, fashion_subset: Dataset, tmp_path: Path
) -> None:
    model = load_model(name)
    data = fashion_subset.subset(stratified_indices(fashion_subset.labels, 1000, seed=0))
    inputs = data.float_images
    graph = LogitsAndFeatures(model)
    path = tmp_path / f"{name}.onnx"
    export_onnx(graph, model.input_shape, path, ["logits", "features"])
    with torch.no_grad():
        logits, features = graph(torch.from_numpy(inputs))
    check = verify_export(path, logits, inputs, "logits", logits)
    assert check.samples == 1000
    assert check.max_abs_diff_vs_torch <= 1e-4
    assert check.label_mismatches_vs_torch == 0
    assert check.label_flips_batch1_vs_64 == 0
    assert check.problems(1e-4) == []
    features_check = verify_export(path, features, inputs, "features", logits)
    assert features_check.max_abs_diff_vs_torch <= 1e-4


def test_graph_has_a_dynamic_batch_axis(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    export_onnx(LogitsAndFeatures(FashionMnistCNN()), (1, 28, 28), path, ["logits", "features"])
    graph = onnx.load(str(path)).graph
    assert [o.name for o in graph.output] == ["logits", "features"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    session = onnx_session(path)
    for batch in (1, 5, 64):
        logits, features = session.run(None, {"input": np.zeros((batch, 1, 28, 28), np.float32)})
        assert logits.shape == (batch, 10) and features.shape == (batch, 128)


def test_export_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    save_weights(FashionMnistCNN(), tmp_path / "w.safetensors")
    out = tmp_path / "out" / "m.onnx"
    args = [
        "fmnist-cnn",
        "--weights",
        str(tmp_path / "w.safetensors"),
        "--out",
        str(out),
        "--verify-samples",
        "200",
    ]
    assert main(args) == 0
    assert "label flips 0" in capsys.readouterr().out and out.exists()
    # a tolerance below float32 noise fails verification and leaves no unverified file behind
    assert main([*args, "--tolerance", "1e-12"]) == 1
    assert "verification failed" in capsys.readouterr().err and not out.exists()
    assert main(["fmnist-cnn", "--out", str(out)]) == 2
    assert "needs a weights file" in capsys.readouterr().err


def _check(diff: float, scale: float) -> ExportCheck:
    empty = np.zeros((0, 2), dtype=np.float32)
    return ExportCheck(
        output="logits",
        samples=8,
        max_abs_diff_vs_torch=diff,
        label_mismatches_vs_torch=0,
        max_abs_diff_batch1_vs_64=0.0,
        label_flips_batch1_vs_64=0,
        reference_scale=scale,
        values=empty,
        labels=np.zeros(0, dtype=np.int64),
    )


def test_the_parity_tolerance_scales_with_the_logits() -> None:
    """float32 rounding grows with magnitude: logits near ±40 differ by ~1e-4 on rounding alone."""
    assert _check(1.4e-4, 40.0).problems(1e-4) == []
    assert _check(5e-3, 40.0).problems(1e-4)  # 40 × 1e-4 = 4e-3: beyond rounding
    assert _check(2e-4, 0.5).problems(1e-4)  # small logits: the absolute floor of 1e-4 holds
    assert _check(9e-5, 0.5).problems(1e-4) == []
