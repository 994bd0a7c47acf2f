"""Time of the nightly traffic check (not a test)

    nice .venv/bin/python bench/traffic_check.py --points 500

Serves --points test images (fashion-mnist-subset) through the shipped version with ONNX
Runtime, as the service does, writes them as traffic shards of 100, and times
`marginwatch-calibrate --traffic DIR --traffic-size N` with the default attacks (FMN and
FAB-top3, 100 steps each) on a copy of the shipped store: a cold run (every point attacked) and
a rerun of the same sample (every chunk cached). Prints the seconds and the check's figures.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from marginwatch.artifact import store
from marginwatch.artifact.traffic import TRAFFIC_CHECK_FILE, TrafficCheck, TrafficShard, write_shard
from marginwatch.calibration.__main__ import main
from marginwatch.models.data import load_dataset
from marginwatch.service.engine import EngineOptions, ServedModel

MODEL = "fmnist-cnn-pgd"


def write_traffic(store_dir: Path, traffic: Path, points: int) -> str:
    images = load_dataset("fashion-mnist-subset", "test").float_images[:points]
    served = ServedModel(MODEL, store.current_dir(store_dir, MODEL), EngineOptions(device="cpu"))
    served.load()
    now = time.time()
    for seq, start in enumerate(range(0, points, 100)):
        part = images[start : start + 100]
        prediction = served.predict(part)
        times = now - 3600 + seq * 60 + torch.arange(len(part)).double().numpy()
        shard = TrafficShard(MODEL, served.version, part, prediction.labels,
                             prediction.scores, prediction.brittle, times)  # fmt: skip
        write_shard(traffic, shard, seq=seq)
    return served.version


def main_bench() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        shutil.copytree(
            store.default_store() / MODEL,
            root / "store" / MODEL,
            ignore=shutil.ignore_patterns(".*"),
        )
        version = write_traffic(root / "store", root / "traffic", args.points)
        argv = ["--store", str(root / "store"), "--traffic", str(root / "traffic"),
                "--traffic-size", str(args.points), "--seed", "0", "--quiet"]  # fmt: skip
        for run in ("cold", "cached"):
            started = time.perf_counter()
            code = main(argv)
            print(f"{run}: exit {code}, {time.perf_counter() - started:.1f} s "
                  f"({torch.get_num_threads()} torch threads)")  # fmt: skip
        check = TrafficCheck.model_validate_json(
            (root / "store" / MODEL / version / TRAFFIC_CHECK_FILE).read_text()
        )
        print(check.model_dump_json(indent=2))


if __name__ == "__main__":
    main_bench()
