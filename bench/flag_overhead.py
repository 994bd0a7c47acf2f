"""Is the flag free? In one process and one run, on the same model and inputs:

- plain inference (the classifier alone, output `logits`, then the label) against served
  inference (a serving graph: `logits` and `score`, then the label and `brittle = score < λ`, as
  the service does), at batch 1 and 64, interleaved rounds, median time; the ratio is served /
  plain (target ≤ 1.03). Two serving graphs: the logit margin (TopK and one MatMul after the
  classifier) and the shipped calibration's own graph (its pseudo-margin MLP), when there is one;
- the alternative the flag replaces: a minimum-norm attack (FMN ℓ∞, 100 steps) per request,
  per-sample cost as a ratio to the served inference with the flag.

    python bench/flag_overhead.py [--rounds 30] [--attack-samples 16]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from marginwatch.artifact.schema import ONNX_FILE
from marginwatch.artifact.store import current_dir, default_store, list_models, read_record
from marginwatch.calibration.attacks.fmn import fmn
from marginwatch.calibration.scores import ServingGraph
from marginwatch.models.architectures import FashionMnistCNN
from marginwatch.models.data import load_dataset
from marginwatch.models.export import export_onnx
from marginwatch.models.registry import ModelError, load_model


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def interleaved_times(
    plain: ort.InferenceSession,
    served: dict[str, tuple[ort.InferenceSession, float]],
    x: np.ndarray,
    rounds: int,
    repeats: int,
) -> dict[str, float]:
    """Median seconds per call of each way to infer, over `rounds` interleaved rounds."""

    def run_plain() -> object:
        return plain.run(["logits"], {"input": x})[0].argmax(1)

    def served_run(graph: ort.InferenceSession, threshold: float) -> Callable[[], object]:
        def run() -> object:
            logits, score = graph.run(["logits", "score"], {"input": x})
            return logits.argmax(1), score < threshold

        return run

    runs = {"plain": run_plain} | {name: served_run(*pair) for name, pair in served.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            started = time.perf_counter()
            for _ in range(repeats):
                run()
            times[name].append(time.perf_counter() - started)
    return {name: float(np.median(values)) / repeats for name, values in times.items()}


def shipped_graph() -> tuple[Path, float, str] | None:
    """The shipped calibration's serving graph, its λ and its score kind, if there is one."""
    store = default_store()
    if "fmnist-cnn-pgd" not in list_models(store):
        return None
    folder = current_dir(store, "fmnist-cnn-pgd")
    record = read_record(folder)
    return folder / ONNX_FILE, record.threshold, record.score_kind


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=30, help="interleaved rounds per batch size")
    parser.add_argument("--repeats", type=int, default=50, help="executions per round")
    parser.add_argument("--attack-samples", type=int, default=16, help="images attacked")
    args = parser.parse_args()
    torch.set_num_threads(1)
    try:
        model = load_model("fmnist-cnn-pgd")
        source = "shipped weights"
    except ModelError:
        torch.manual_seed(0)
        model = FashionMnistCNN().eval()
        source = "random weights (shipped ones missing)"
    images = load_dataset("fashion-mnist-subset", "test").float_images
    with tempfile.TemporaryDirectory() as scratch:
        plain_path, margin_path = Path(scratch) / "plain.onnx", Path(scratch) / "served.onnx"
        export_onnx(model, (1, 28, 28), plain_path, ["logits"])
        export_onnx(ServingGraph(model).eval(), (1, 28, 28), margin_path, ["logits", "score"])
        plain = session(plain_path)
        served = {"logit margin": (session(margin_path), 0.5)}
    shipped = shipped_graph()
    if shipped is not None and source == "shipped weights":
        served[f"shipped {shipped[2]}"] = (session(shipped[0]), shipped[1])
    print(f"FashionMnistCNN ({source}); ONNX Runtime CPU, 1 thread")
    per_sample_flag_s = 0.0
    for batch in (1, 64):
        times = interleaved_times(plain, served, images[:batch], args.rounds, args.repeats)
        line = f"batch {batch:2d}: plain {times['plain'] * 1e6:8.1f} µs"
        for name in served:
            ratio = times[name] / times["plain"]
            line += f"; {name} {times[name] * 1e6:8.1f} µs, ratio {ratio:.3f}"
        print(line)
        if batch == 1:
            per_sample_flag_s = times["logit margin"]
    inputs = torch.from_numpy(images[: args.attack_samples])
    with torch.no_grad():
        labels = model(inputs).argmax(1)
    started = time.perf_counter()
    fmn(model, inputs, labels, norm=float("inf"), steps=100)
    attack_s = (time.perf_counter() - started) / len(inputs)
    ratio = attack_s / per_sample_flag_s
    print(f"FMN ℓ∞ 100 steps: {attack_s * 1e3:.1f} ms per sample (batch {len(inputs)}), "
          f"{ratio:,.0f}× the served inference with flag at batch 1")  # fmt: skip


if __name__ == "__main__":
    main()
