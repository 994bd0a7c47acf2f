"""Is the flag free? In one process and one run, on the same model and inputs:

- plain inference (the classifier alone, output `logits`) against served inference (the serving
  graph: `logits` and `score`, then `brittle = score < λ`, as the service does), at batch 1 and
  64, interleaved rounds, median time; the ratio is served / plain (target ≤ 1.03);
- the alternative the flag replaces: a minimum-norm attack (FMN ℓ∞, 100 steps) per request,
  per-sample cost as a ratio to the served inference with the flag.

    python bench/flag_overhead.py [--rounds 30] [--attack-samples 16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from calibration.attacks.fmn import fmn  # noqa: E402
from calibration.scores import ServingGraph  # noqa: E402
from models.architectures import FashionMnistCNN  # noqa: E402
from models.data import load_dataset  # noqa: E402
from models.export import export_onnx  # noqa: E402
from models.registry import ModelError, load_model  # noqa: E402


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def median_time_s(run: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


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
        plain_path, served_path = Path(scratch) / "plain.onnx", Path(scratch) / "served.onnx"
        export_onnx(model, (1, 28, 28), plain_path, ["logits"])
        export_onnx(ServingGraph(model).eval(), (1, 28, 28), served_path, ["logits", "score"])
        plain, served = session(plain_path), session(served_path)
    threshold = 0.5
    print(f"FashionMnistCNN ({source}); ONNX Runtime CPU, 1 thread")
    per_sample_flag_s = 0.0
    for batch in (1, 64):
        x = images[:batch]

        def run_plain(x: np.ndarray = x) -> object:
            return plain.run(["logits"], {"input": x})[0].argmax(1)

        def run_served(x: np.ndarray = x) -> object:
            logits, score = served.run(["logits", "score"], {"input": x})
            return logits.argmax(1), score < threshold

        plain_s, served_s = [], []
        for _ in range(args.rounds):
            plain_s.append(median_time_s(lambda: [run_plain() for _ in range(args.repeats)], 1))
            served_s.append(median_time_s(lambda: [run_served() for _ in range(args.repeats)], 1))
        plain_t = float(np.median(plain_s)) / args.repeats
        served_t = float(np.median(served_s)) / args.repeats
        print(f"batch {batch:2d}: plain {plain_t * 1e6:8.1f} µs, with score and flag "
              f"{served_t * 1e6:8.1f} µs, ratio {served_t / plain_t:.3f}")  # fmt: skip
        if batch == 1:
            per_sample_flag_s = served_t
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
