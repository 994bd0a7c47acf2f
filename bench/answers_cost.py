"""What the robustness answers cost a served request: one `marginwatch-serve`, two models in one
store, the same ONNX graph and λ: `with` is the shipped version as published (its budget grid
and margin quantiles: p_robust, the margin's estimate and interval, the runner-up, all
answered), `without` the same version with `budgets` and `margin_quantiles` taken out of its
record (the flag as before issue 20; the answers' fields come back null/NaN, the runner-up
stays). wrk at concurrency 1 (the latency-bound case, batch 1) sends each model the same
one-image body, v1 JSON and OIP v2 JSON, a few seconds per point, the two models alternating
(order rotated per round); per-round ratio of requests per second, median over the rounds.

    python bench/answers_cost.py [--rounds 5] [--duration-s 4]

`bench/flag_overhead.py` measures the same answers inside one execution (µs after
`session.run`); this is the cost a client sees.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from overload import WRK_LUA, parse_wrk
from serve_load import free_port, median_ratio, request_body, request_path

from marginwatch.artifact.schema import RECORD_FILE
from marginwatch.artifact.store import current_dir, default_store, read_record
from marginwatch.models.data import load_dataset

MODEL = "fmnist-cnn-pgd"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--duration-s", type=int, default=4, help="seconds of wrk per point")
    parser.add_argument("--store", type=Path, default=default_store(), help="store to take from")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    return parser.parse_args()


def make_store(source: Path, scratch: Path) -> Path:
    """`with` and `without`: the served version twice, the second without its answers."""
    store = scratch / "store"
    version = current_dir(source, MODEL)
    record = read_record(version)
    if record.budgets is None:
        raise SystemExit(f"{version} was calibrated before the answers: nothing to compare")
    bare = record.model_copy(update={"budgets": None, "margin_quantiles": None})
    for name, kept in (("with", record), ("without", bare)):
        folder = store / name / version.name
        shutil.copytree(version, folder)
        renamed = kept.model_copy(update={"model_name": name})  # a version names its model
        (folder / RECORD_FILE).write_text(renamed.model_dump_json(indent=2))
        (store / name / "CURRENT").write_text(version.name + "\n")
    return store


def wait_ready(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit("the server exited before it was ready")
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("the server was not ready after 60 s")


def main() -> None:
    args = parse_args()
    image = load_dataset("fashion-mnist-subset", "test").float_images[:1]
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        store = make_store(args.store, scratch)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MARGINWATCH_INTRA_OP_THREADS": "1"}
        command = [sys.executable, "-m", "marginwatch.service", "--store", str(store),
                   "--port", str(port)]  # fmt: skip
        server = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
        try:
            wait_ready(url, server)
            scripts = {}
            for api in ("v1", "v2"):
                (scratch / f"{api}.json").write_bytes(request_body(api, image))
                scripts[api] = scratch / f"{api}.lua"
                scripts[api].write_text(WRK_LUA.format(body=scratch / f"{api}.json"))
            results = measure(args, url, scripts)
        finally:
            server.terminate()
            server.wait(20)
    report(results, args)


def wrk_one(url: str, script: Path, args: argparse.Namespace) -> dict[str, float]:
    """wrk with one thread and one connection: one request at a time."""
    command = ["wrk", "-t", "1", "-c", "1", "-d", f"{args.duration_s}s", "-s", str(script), url]
    return parse_wrk(subprocess.run(command, capture_output=True, text=True, check=True).stdout)


def measure(
    args: argparse.Namespace, url: str, scripts: dict[str, Path]
) -> dict[str, list[dict[str, float]]]:
    """Per api and model, one wrk result per round (models alternating, order rotated)."""
    results: dict[str, list[dict[str, float]]] = {}
    print(f"load average {os.getloadavg()[0]:.2f} before, {os.cpu_count()} CPUs", flush=True)
    for round_ in range(args.rounds):
        for api, script in scripts.items():
            models = ["with", "without"][:: 1 if round_ % 2 == 0 else -1]
            for model in models:
                result = wrk_one(url + request_path(api, "marginwatch", model), script, args)
                if result["other"] or result["refused"]:
                    raise SystemExit(f"{api} {model}: answers other than 200: {result}")
                results.setdefault(f"{api} {model}", []).append(result)
        print(f"round {round_ + 1} done, load average {os.getloadavg()[0]:.2f}", flush=True)
    return results


def report(results: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> None:
    figures = {}
    print("| API | with answers req/s (p50 / p99 µs) | without req/s (p50 / p99 µs) | "
          "cost: without / with req/s, per round |")  # fmt: skip
    print("|---|---:|---:|---:|")
    for api in ("v1", "v2"):
        with_, without = results[f"{api} with"], results[f"{api} without"]
        ratios = [b["ok_per_s"] / a["ok_per_s"] for a, b in zip(with_, without, strict=True)]

        def cell(runs: list[dict[str, float]]) -> str:
            rate = statistics.median(run["ok_per_s"] for run in runs)
            p50 = statistics.median(run["p50_us"] for run in runs)
            p99 = statistics.median(run["p99_us"] for run in runs)
            return f"{rate:,.0f} ({p50:,.0f} / {p99:,.0f})"

        print(f"| {api} | {cell(with_)} | {cell(without)} | {median_ratio(ratios)} |")
        figures[api] = {"ratios": ratios, "median_cost": statistics.median(ratios)}
    print(f"load average {os.getloadavg()[0]:.2f} after")
    if args.out is not None:
        args.out.write_text(json.dumps({"figures": figures, "runs": results}, indent=1))


if __name__ == "__main__":
    main()
