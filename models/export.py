"""ONNX export with a dynamic batch axis, verified against torch before it is trusted.

`marginwatch-export` writes a graph with outputs `logits` and `features`. The calibration job
reuses `export_onnx` and `verify_export` for the serving graph (`logits`, `score`).
"""

from __future__ import annotations

import argparse
import io
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from marginwatch.artifact.graph import INPUT_NAME, LOGITS
from marginwatch.models.architectures import SplitClassifier
from marginwatch.models.cli import (
    OptionsError,
    command_parser,
    data_dir_field,
    dataset_field,
    parse_options,
)
from marginwatch.models.data import DataError, load_dataset, stratified_indices
from marginwatch.models.registry import ModelError, image_shape, load_model

OPSET = 17
PROG = "marginwatch-export"
DESCRIPTION = (
    "Export a model to ONNX (outputs `logits` and `features`, dynamic batch axis) and verify it: "
    "ONNX Runtime against torch, and batch 1 against batch 64."
)


class LogitsAndFeatures(nn.Module):
    """The graph `marginwatch-export` writes: both outputs from one pass through the trunk."""

    def __init__(self, model: SplitClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features, logits = self.model.features_and_logits(inputs)
        return logits, features


def _traceable(graph: nn.Module, example: torch.Tensor) -> nn.Module:
    """`graph` in a form the ONNX exporter can trace. Its tracer refuses a TorchScript module
    called from inside another module ("not part of the active trace": a TorchScript file
    behind an adapter or a factory), but `torch.jit.trace` accepts it, and a traced module
    exports as a whole. Graphs without TorchScript parts are exported as they are."""
    if not any(isinstance(module, torch.jit.ScriptModule) for module in graph.modules()):
        return graph
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the same as the exporter's
        traced = torch.jit.trace(graph, (example,), check_trace=False)
    return cast(nn.Module, traced)


def export_onnx(
    graph: nn.Module,
    input_shape: Sequence[int],
    path: Path | io.BytesIO,
    output_names: Sequence[str],
) -> None:
    """Write `graph` to `path` (or into a buffer: the preflight's trial export writes nothing)
    with input `input` (float32, N×`input_shape`), batch axis dynamic."""
    graph.eval()
    example = torch.rand(2, *input_shape)
    dynamic_axes = {name: {0: "batch"} for name in [INPUT_NAME, *output_names]}
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo, which needs onnxscript;
        # this one has no extra dependency and handles these graphs exactly.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        # Constants the tracer bakes in (the logit margin's (1, −1); an ExportedProgram's shape
        # guards) are meant to be constants; a trace that would not generalise shows up in the
        # parity checks that follow every export (torch, and batch 1 against 64).
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # A traced TorchScript graph (`_traceable`) has no Python signature to read names from.
        warnings.filterwarnings("ignore", message="no signature found for", category=UserWarning)
        torch.onnx.export(
            _traceable(graph, example),
            (example,),
            # a buffer works with this exporter (dynamo=False), its annotation names files only
            path if isinstance(path, io.BytesIO) else str(path),  # type: ignore[arg-type]
            input_names=[INPUT_NAME],
            output_names=list(output_names),
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            dynamo=False,
        )


def onnx_session(path: Path | bytes, threads: int | None = None):  # type: ignore[no-untyped-def]
    """An ONNX Runtime CPU session on a file, or on a serialised graph held in memory."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    source = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run_batched(session, inputs: np.ndarray, output: str, batch_size: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    parts = [
        session.run([output], {INPUT_NAME: inputs[start : start + batch_size]})[0]
        for start in range(0, len(inputs), batch_size)
    ]
    return np.concatenate(parts)


@dataclass(frozen=True)
class ExportCheck:
    """Parity of ONNX Runtime with torch, and of batch 1 with batch 64 inside ONNX Runtime."""

    output: str
    samples: int
    max_abs_diff_vs_torch: float
    label_mismatches_vs_torch: int
    max_abs_diff_batch1_vs_64: float
    label_flips_batch1_vs_64: int
    # the largest |value| torch gives: the tolerance scales with it, since float32 rounding
    # grows with the magnitude (logits near ±40 differ by ~1e-4 for rounding alone)
    reference_scale: float
    # ONNX Runtime's own results at batch 64, for callers that need them after the check
    values: np.ndarray = field(repr=False, compare=False)
    labels: np.ndarray = field(repr=False, compare=False)

    def problems(self, tolerance: float) -> list[str]:
        """What fails the check; `tolerance` is relative to max(1, the largest |value|)."""
        found = []
        allowed = tolerance * max(1.0, self.reference_scale)
        if self.max_abs_diff_vs_torch > allowed:
            found.append(
                f"{self.output}: ONNX Runtime differs from torch by "
                f"{self.max_abs_diff_vs_torch:.2e} > {allowed:.2e} ({tolerance:.0e} × max(1, "
                f"largest |{self.output}| {self.reference_scale:.3g}))"
            )
        if self.label_mismatches_vs_torch:
            found.append(f"{self.label_mismatches_vs_torch} labels differ from torch")
        if self.label_flips_batch1_vs_64:
            found.append(f"{self.label_flips_batch1_vs_64} labels flip between batch 1 and 64")
        return found


def verify_export(
    path: Path | bytes,
    reference: torch.Tensor,
    inputs: np.ndarray,
    output: str,
    logits: torch.Tensor,
) -> ExportCheck:
    """Compare `output` of the ONNX file at `path` with `reference` (torch's, same inputs);
    labels come from `logits` in torch and from the graph's `logits` output in ONNX Runtime."""
    session = onnx_session(path)
    at_64 = run_batched(session, inputs, output, 64)
    at_1 = run_batched(session, inputs, output, 1)
    onnx_labels_64 = run_batched(session, inputs, LOGITS, 64).argmax(1)
    onnx_labels_1 = run_batched(session, inputs, LOGITS, 1).argmax(1)
    return ExportCheck(
        output=output,
        samples=len(inputs),
        max_abs_diff_vs_torch=float(np.abs(at_64 - reference.numpy()).max()),
        label_mismatches_vs_torch=int((onnx_labels_64 != logits.argmax(1).numpy()).sum()),
        max_abs_diff_batch1_vs_64=float(np.abs(at_1 - at_64).max()),
        label_flips_batch1_vs_64=int((onnx_labels_1 != onnx_labels_64).sum()),
        reference_scale=float(np.abs(reference.numpy()).max(initial=0.0)),
        values=at_64,
        labels=onnx_labels_64,
    )


class ExportOptions(BaseModel):
    """`marginwatch-export`'s options, one flag each (`artifact.cli_settings`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(
        min_length=1,
        description="shipped model (fmnist-cnn-pgd, fmnist-cnn-standard), "
        "architecture name with --weights, TorchScript file, or module:factory",
        json_schema_extra={"positional": True, "metavar": "model"},
    )
    weights: Path | None = Field(default=None, description="weights file for the model")
    out: Path = Field(description="path of the .onnx file to write")
    dataset: str = dataset_field(default="fashion-mnist-subset", role="verification data")
    data_dir: Path | None = data_dir_field()
    verify_samples: int = Field(
        default=1000, ge=1, description="test images used for the parity checks"
    )
    tolerance: float = Field(
        default=1e-4,
        gt=0,
        description="largest accepted |ONNX − torch| on any logit, relative to max(1, largest "
        "|logit|)",
    )


def build_parser() -> argparse.ArgumentParser:
    return command_parser(PROG, DESCRIPTION, ExportOptions)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_options(ExportOptions, build_parser(), argv)
        data = load_dataset(args.dataset, "test", args.data_dir)
        data = data.subset(stratified_indices(data.labels, min(args.verify_samples, len(data)), 0))
        # a model that does not carry its input shape takes the dataset's
        model = load_model(args.model, args.weights, input_shape=image_shape(data.images))
    except (OptionsError, ModelError, DataError) as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 2
    if data.images.shape[1:] != tuple(model.input_shape):
        print(
            f"{PROG}: data shape {data.images.shape[1:]} does not match the "
            f"model's input shape {tuple(model.input_shape)}",
            file=sys.stderr,
        )
        return 2
    graph = LogitsAndFeatures(model)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(graph, model.input_shape, args.out, [LOGITS, "features"])
    inputs = data.float_images
    with torch.no_grad():
        logits, _ = graph(torch.from_numpy(inputs))
    check = verify_export(args.out, logits, inputs, LOGITS, logits)
    print(
        f"wrote {args.out}; on {check.samples} images: max |ONNX − torch| logit "
        f"{check.max_abs_diff_vs_torch:.2e}, label mismatches {check.label_mismatches_vs_torch}; "
        f"batch 1 vs 64: max |Δlogit| {check.max_abs_diff_batch1_vs_64:.2e}, "
        f"label flips {check.label_flips_batch1_vs_64}"
    )
    problems = check.problems(args.tolerance)
    if problems:
        args.out.unlink()
        print(f"{PROG}: verification failed: " + "; ".join(problems), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
