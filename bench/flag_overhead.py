"""Is the flag free? In one process and one run, on the same model and inputs:

- plain inference (the classifier alone, output `logits`, then the label) against served
  inference (a serving graph: `logits` and `score`, then the label and `brittle = score < λ`, as
  the service does), at batch 1 and 64, interleaved rounds, median time; the ratio is served /
  plain (target ≤ 1.03). Two serving graphs: the logit margin (TopK and one MatMul after the
  classifier) and the shipped calibration's own graph (its pseudo-margin MLP), when there is one;
- the robustness answers (issue 20: p_robust, the margin estimate and interval, the runner-up):
  `ServedModel.predict` of the shipped version as it is (all of them) against the same without
  its grid and margin quantiles (`budgets`, `margin_quantiles` None: the flag, NaN answers and
  still the runner-up) and against the engine before them (session.run, the label and the flags,
  on the same session), same rounds, median; then `runner_up` and `Answers.served_answers`
  (p_robust and the margin's three quantiles) alone (timeit). A record written before the grid
  gets stand-in answers of the job's shape (the output says so), so their µs are still measured;
- the alternative the flag replaces: a minimum-norm attack (FMN ℓ∞, 100 steps) per request,
  per-sample cost as a ratio to the served inference with the flag.

    python bench/flag_overhead.py [--rounds 30] [--attack-samples 16]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import timeit
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from marginwatch.artifact import flags
from marginwatch.artifact.answers import Answers, Budget, answers_of, runner_up
from marginwatch.artifact.graph import INPUT_NAME, OUTPUTS
from marginwatch.artifact.schema import ONNX_FILE, CalibrationRecord, MarginQuantiles
from marginwatch.artifact.store import current_dir, default_store, list_models, read_record
from marginwatch.calibration.attacks.fmn import fmn
from marginwatch.calibration.scores import ServingGraph
from marginwatch.models.architectures import FashionMnistCNN
from marginwatch.models.data import load_dataset
from marginwatch.models.export import export_onnx
from marginwatch.models.registry import ModelError, load_model
from marginwatch.service.engine import EngineOptions, ServedModel


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def round_times(
    runs: dict[str, Callable[[], object]], rounds: int, repeats: int
) -> dict[str, list[float]]:
    """Seconds per call of each run, one figure per round: the runs take turns within each
    round, so a drift of the machine's speed touches them alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            started = time.perf_counter()
            for _ in range(repeats):
                run()
            times[name].append((time.perf_counter() - started) / repeats)
    return times


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
    times = round_times(runs, rounds, repeats)
    return {name: float(np.median(values)) for name, values in times.items()}


def shipped_graph() -> tuple[Path, float, str] | None:
    """The shipped calibration's serving graph, its λ and its score kind, if there is one."""
    store = default_store()
    if "fmnist-cnn-pgd" not in list_models(store):
        return None
    folder = current_dir(store, "fmnist-cnn-pgd")
    record = read_record(folder)
    return folder / ONNX_FILE, record.threshold, record.score_kind


def stand_in_answers(record: CalibrationRecord) -> Answers:
    """For a record written before the grid: answers shaped as the job writes them (four budgets
    whose p_robust is the record's live curve, margin quantiles at 0.1, 0.5, 0.9 on 12 knots: a
    500-point subset's bins), so the served path evaluates curves as it would for a new one."""
    eps, live = record.threat_model.eps, record.live_curve
    budgets = tuple(
        Budget(eps * k, record.threshold, live, live, record.robust_accuracy.estimate)
        for k in (0.25, 0.5, 1.0, 2.0)
    )
    knots = np.linspace(min(live.knots_x), max(live.knots_x), 12)
    rows = [np.linspace(0.0, eps, 12) * scale for scale in (0.5, 1.0, 2.0)]
    margin = MarginQuantiles(
        levels=[0.1, 0.5, 0.9], knots_x=knots.tolist(), knots_y=np.array(rows).tolist(),
        interval=0.8,
    )  # fmt: skip
    return Answers(budgets, 2, margin)


@dataclass(slots=True)
class OldPrediction:
    """The engine's `Prediction` before issue 20: the flag's five arrays."""

    logits: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    brittle: np.ndarray
    borderline: np.ndarray


def answers_times(
    served: ServedModel, answers: Answers, x: np.ndarray, rounds: int, repeats: int
) -> dict[str, tuple[float, float]]:
    """Seconds per call over interleaved rounds, the median round's and the fastest round's (on
    a shared machine the fastest is the least disturbed): predict with the answers, predict with
    the record's grid and quantiles removed, and the engine before issue 20 on the same
    session."""
    bare = answers_of(served.record.model_copy(update={"budgets": None, "margin_quantiles": None}))

    def old_engine() -> object:
        # `ServedModel.predict` as it was before issue 20 (da57b96), line for line
        record, session = served._require()
        logits, scores = session.run(list(OUTPUTS), {INPUT_NAME: x})
        brittle = flags.brittle(scores, record.threshold)
        borderline = flags.borderline(scores, record.threshold, record.guard_band)
        return OldPrediction(logits, scores, logits.argmax(axis=1), brittle, borderline)

    def predict_with(chosen: Answers) -> Callable[[], object]:
        def run() -> object:
            served.answers = chosen  # one attribute store in every variant: a few ns
            return served.predict(x)

        return run

    runs = {"old": old_engine, "bare": predict_with(bare), "answers": predict_with(answers)}
    times = round_times(runs, rounds, repeats)
    served.answers = answers
    return {name: (float(np.median(values)), min(values)) for name, values in times.items()}


def piece_times(answers: Answers, served: ServedModel, x: np.ndarray) -> dict[str, float]:
    """Each new output's numpy alone on this batch's logits and scores (seconds per call, the
    least of 7 timeit repeats: the uncontended cost, as timeit advises)."""
    logits, scores = served._require()[1].run(list(OUTPUTS), {INPUT_NAME: x})
    labels = logits.argmax(axis=1)
    pieces: dict[str, Callable[[], object]] = {
        "runner_up": lambda: runner_up(logits, labels),
        "served_answers": lambda: answers.served_answers(scores),
    }
    return {
        name: min(timeit.repeat(piece, number=2000, repeat=7)) / 2000
        for name, piece in pieces.items()
    }


def answers_section(images: np.ndarray, rounds: int, repeats: int) -> None:
    """The serving cost of issue 20's outputs, on the shipped version (skipped without one)."""
    store = default_store()
    if "fmnist-cnn-pgd" not in list_models(store):
        print("robustness answers: no shipped fmnist-cnn-pgd version, skipped")
        return
    folder = current_dir(store, "fmnist-cnn-pgd")
    served = ServedModel("fmnist-cnn-pgd", folder, EngineOptions("cpu", 1, 1))
    served.load()
    answers, source = served.answers, "the record's own grid and margin quantiles"
    if served.record.budgets is None or served.record.margin_quantiles is None:
        answers = stand_in_answers(served.record)
        source = "stand-in answers (the record predates the grid)"
    print(f"robustness answers, version {served.version}, {source}:")
    for batch in (1, 64):
        x = np.ascontiguousarray(images[:batch])
        times = answers_times(served, answers, x, rounds, repeats)
        (old, old_min), (bare, bare_min) = times["old"], times["bare"]
        full, full_min = times["answers"]
        print(
            f"batch {batch:2d}: engine before {old * 1e6:8.1f} µs; predict without grid "
            f"{bare * 1e6:8.1f} µs ({bare / old:.3f}); predict with answers {full * 1e6:8.1f} µs"
            f", ratio {full / old:.3f} to the engine before, {full / bare:.3f} to no grid "
            f"(fastest rounds: {full_min / old_min:.3f}, {full_min / bare_min:.3f})"
        )
        pieces = piece_times(answers, served, x)
        added = sum(pieces.values())
        print(
            "          alone: " + ", ".join(f"{k} {v * 1e6:.2f} µs" for k, v in pieces.items())
            + f"; their sum over the engine before's fastest round: {1 + added / old_min:.3f}"
        )  # fmt: skip


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
    if source == "shipped weights":
        answers_section(images, args.rounds, args.repeats)
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
