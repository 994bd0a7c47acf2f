"""What does traffic sampling cost a request? In one process, the batch runner exactly as the
registry builds it (`deployment.batch_runner`: ONNX Runtime on the shipped `fmnist-cnn-pgd`, the
metrics record, then `TrafficSampler.offer`), at sampling rates 0 (no sampler: the default),
0.01 and 1.0, at batch 1 and 64, in interleaved rounds, median time per batch. The sampler's
writer thread runs meanwhile and writes real shards into a temporary folder, so its share of the
GIL is in the figures; then `offer` alone, timed by itself (what sampling adds to a batch, less
noisy than the difference of two model runs); the samples written and dropped are printed too.

    python bench/traffic_sampling.py [--rounds 30] [--repeats 200]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from argparse import Namespace
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from marginwatch.artifact.store import current_dir, default_store
from marginwatch.models.data import load_dataset
from marginwatch.service.deployment import batch_runner
from marginwatch.service.engine import EngineOptions, Prediction, ServedModel
from marginwatch.service.metrics import ServiceMetrics
from marginwatch.service.traffic_sampler import TrafficSampler

MODEL = "fmnist-cnn-pgd"
RATES = (0.0, 0.01, 1.0)


def counted(metrics: ServiceMetrics) -> dict[str, float]:
    text = metrics.exposition().decode()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("marginwatch_traffic_samples_") and sample.name.endswith(
                "_total"
            ):
                key = sample.labels.get("reason", "written")
                totals[key] = totals.get(key, 0.0) + sample.value
    return totals


def median_us(call: Callable[[], object], rounds: int, repeats: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(repeats):
            call()
        times.append(time.perf_counter() - started)
    return float(np.median(times)) / repeats * 1e6


def runner_table(
    runs: dict[float, Callable[[np.ndarray], Prediction]], images: np.ndarray, args: Namespace
) -> None:
    print("| batch | rate 0 (off) | rate 0.01 | ratio | rate 1.0 | ratio |")
    print("|---:|---:|---:|---:|---:|---:|")
    for batch in (1, 64):
        x = np.ascontiguousarray(images[:batch])
        per_batch: dict[float, list[float]] = {rate: [] for rate in runs}
        for _ in range(args.rounds):  # interleaved: a load change hits every rate alike
            for rate, run in runs.items():
                per_batch[rate].append(median_us(partial(run, x), 1, args.repeats))
        off, some, every = (float(np.median(per_batch[rate])) for rate in RATES)
        print(
            f"| {batch} | {off:.1f} µs | {some:.1f} µs | {some / off:.3f} "
            f"| {every:.1f} µs | {every / off:.3f} |"
        )


def offer_table(
    model: ServedModel, samplers: dict[float, TrafficSampler], images: np.ndarray, args: Namespace
) -> None:
    print("\n`offer` alone (what sampling adds to a batch), median per call:")
    print("| batch | rate 0.01 | rate 1.0 |")
    print("|---:|---:|---:|")
    for batch in (1, 64):
        x = np.ascontiguousarray(images[:batch])
        prediction = model.predict(x)
        cost = {
            rate: median_us(
                partial(sampler.offer, MODEL, model.version, x, prediction),
                args.rounds, args.repeats,
            )
            for rate, sampler in samplers.items()
        }  # fmt: skip
        print(f"| {batch} | {cost[0.01]:.2f} µs | {cost[1.0]:.2f} µs |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30, help="interleaved rounds per batch size")
    parser.add_argument("--repeats", type=int, default=200, help="batches per round")
    args = parser.parse_args()
    model = ServedModel(MODEL, current_dir(default_store(), MODEL), EngineOptions(
        intra_op_threads=1, inter_op_threads=1))  # fmt: skip
    model.load()
    images = load_dataset("fashion-mnist-subset", "test").float_images
    with tempfile.TemporaryDirectory() as scratch:
        runs: dict[float, Callable[[np.ndarray], Prediction]] = {}
        samplers: dict[float, TrafficSampler] = {}
        metrics: dict[float, ServiceMetrics] = {}
        for rate in RATES:
            metrics[rate] = ServiceMetrics(1000, traffic_sample_rate=rate)
            if rate > 0:
                samplers[rate] = TrafficSampler(
                    Path(scratch) / f"rate-{rate}", metrics[rate], rate=rate,
                    max_bytes_per_day=1 << 40, retention_days=1, queue_samples=4096,
                    shard_samples=1024, flush_s=5.0,
                )  # fmt: skip
                samplers[rate].start()
            runs[rate] = batch_runner(model, metrics[rate], samplers.get(rate))
        runner_table(runs, images, args)
        offer_table(model, samplers, images, args)
        for rate, sampler in samplers.items():
            sampler.stop(60)
            print(f"rate {rate}: samples {counted(metrics[rate])}")


if __name__ == "__main__":
    main()
