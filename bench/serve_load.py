"""The service under load on loopback, side by side with LitServe and a minimal FastAPI endpoint.

Same ONNX graph, same JSON body (`{"inputs": [...]}`), same load generator: for each server in
turn (one at a time, so they never share the cores), keep-alive connections send requests back
to back for `--duration-s` at each concurrency, for one-image and 32-image bodies. The generator
is a lean asyncio HTTP/1.1 client (pre-encoded request, Content-Length framing) so that it costs
the machine as little as possible; it stops by itself. Prints throughput, p50/p99 latency, the
ratios against both baselines, and each server's peak resident memory.

    python bench/serve_load.py                       # everything, about 2 minutes
    python bench/serve_load.py --servers marginwatch --concurrency 1 --images 1
    python bench/serve_load.py --servers marginwatch minimal --images 1 --rounds 5  # medians

Needs LitServe only for the `litserve` server (install it beside the project, not in it). With
no --store, the model comes from `artifacts/` when a calibrated one is there, else a store is
made in a temporary folder from the shipped weights (random weights if they are missing).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import orjson

from marginwatch.artifact.store import current_dir, default_store, list_models
from marginwatch.models.data import load_dataset

PROJECT = Path(__file__).resolve().parent.parent
SERVERS = ("marginwatch", "minimal", "litserve")


@dataclass
class Point:
    server: str
    images: int
    concurrency: int
    requests: int
    errors: int
    requests_per_s: float
    samples_per_s: float
    p50_ms: float
    p99_ms: float
    round: int = 0

    def line(self) -> str:
        return (
            f"  {self.server:12s} images {self.images:3d} conc {self.concurrency:3d}: "
            f"{self.requests_per_s:8.0f} req/s  p50 {self.p50_ms:7.2f} ms  "
            f"p99 {self.p99_ms:7.2f} ms  errors {self.errors}"
        )


def median_ratio(ratios: Sequence[float], *, bold: bool = False, each_round: bool = True) -> str:
    """Per-round ratios as the benchmarks' tables show them: the median as `1.23×` (in bold for a
    headline column), then each round's when there are several, `1.23× (1.20, 1.25, 1.23)`;
    empty when no round has one. The one ratio formatter of bench/."""
    if not ratios:
        return ""
    median = f"{statistics.median(ratios):.2f}×"
    shown = f"**{median}**" if bold else median
    if each_round and len(ratios) > 1:
        shown += f" ({', '.join(f'{ratio:.2f}' for ratio in ratios)})"
    return shown


def summarise(
    server: str,
    images: int,
    concurrency: int,
    *,
    latencies: list[float],
    errors: list[int],
    duration_s: float,
) -> Point:
    ms = np.array(latencies) * 1000
    rate = len(latencies) / duration_s
    return Point(server, images, concurrency, len(latencies), len(errors), rate, rate * images,
                 float(np.percentile(ms, 50)), float(np.percentile(ms, 99)))  # fmt: skip


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def make_store(folder: Path) -> tuple[Path, str]:
    """A store with one version of fmnist-cnn-pgd (shipped weights, else seeded random ones)."""
    import torch

    # The tests' helper (export + hand-written record) lives in tests/, which is not installed.
    sys.path.insert(0, str(PROJECT / "tests" / "service"))
    from conftest import make_version

    from marginwatch.calibration.scores import ServingGraph
    from marginwatch.models.architectures import FashionMnistCNN
    from marginwatch.models.export import export_onnx
    from marginwatch.models.registry import ModelError, load_model

    try:
        model = load_model("fmnist-cnn-pgd")
    except ModelError:
        torch.manual_seed(0)
        model = FashionMnistCNN().eval()
    onnx = folder / "graph.onnx"
    export_onnx(ServingGraph(model).eval(), (1, 28, 28), onnx, ["logits", "score"])
    images = load_dataset("fashion-mnist-subset", "test").float_images[:256]
    make_version(folder / "store", "fmnist-cnn-pgd", "bench", onnx=onnx, images=images)
    return folder / "store", "fmnist-cnn-pgd"


def choose_model(store: Path | None, scratch: Path) -> tuple[Path, str]:
    if store is not None:
        return store, list_models(store)[0]
    shipped = default_store()
    if list_models(shipped):
        return shipped, list_models(shipped)[0]
    return make_store(scratch)


def server_command(name: str, store: Path, model: str, port: int, threads: int) -> list[str]:
    onnx = str(current_dir(store, model) / "model.onnx")
    if name == "marginwatch":
        return [sys.executable, "-m", "marginwatch.service", "--port", str(port),
                "--store", str(store),
                "--models", model, "--log-level", "warning"]  # fmt: skip
    script = PROJECT / "bench" / f"{name}_baseline.py"
    return [sys.executable, str(script), "--onnx", onnx, "--port", str(port),
            "--threads", str(threads)]  # fmt: skip


def peak_rss_mb(pid: int) -> float:
    """VmHWM of the process and its children (LitServe runs workers in child processes)."""
    total = 0
    pids = [pid]
    with contextlib.suppress(OSError):
        pids += [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    for each in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{each}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
    return total / 1024


@contextlib.contextmanager
def running(command: list[str], env_extra: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env_extra}
    process = subprocess.Popen(
        command, cwd=PROJECT, env=env, stdout=subprocess.DEVNULL, start_new_session=True
    )
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def encode_request(path: str, body: bytes, content_type: str = "application/json") -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    marker = lower.find(b"content-length:")
    if marker >= 0:
        end = lower.find(b"\r\n", marker)
        await reader.readexactly(int(lower[marker + 15 : end]))
        return status
    while True:  # chunked
        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
        await reader.readexactly(size + 2)
        if size == 0:
            return status


async def one_connection(
    port: int, request: bytes, deadline: float, latencies: list[float], errors: list[int]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            writer.write(request)
            status = await read_response(reader)
            latencies.append(time.perf_counter() - started)
            if status != 200:
                errors.append(status)
    finally:
        writer.close()


async def load(
    port: int, request: bytes, concurrency: int, duration_s: float
) -> tuple[list[float], list[int]]:
    latencies: list[float] = []
    errors: list[int] = []
    deadline = time.perf_counter() + duration_s
    await asyncio.gather(
        *(one_connection(port, request, deadline, latencies, errors) for _ in range(concurrency))
    )
    return latencies, errors


def wait_ready(port: int, request: bytes, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, ValueError):
            _, errors = asyncio.run(load(port, request, 1, 0.01))
            if not errors:
                return
        time.sleep(0.2)
    raise RuntimeError("server did not answer in 90 s")


def measure(
    args: argparse.Namespace, name: str, store: Path, model: str
) -> tuple[list[Point], float]:
    port = free_port()
    path = f"/v1/models/{model}/predict" if name == "marginwatch" else "/predict"
    images = load_dataset("fashion-mnist-subset", "test").float_images
    points = []
    env = {"MARGINWATCH_INTRA_OP_THREADS": str(args.threads)}
    if args.inline_max_samples is not None:
        env["MARGINWATCH_INLINE_MAX_SAMPLES"] = str(args.inline_max_samples)
    with running(server_command(name, store, model, port, args.threads), env) as process:
        bodies = {
            n: encode_request(path, orjson.dumps({"inputs": images[:n].tolist()}))
            for n in args.images
        }
        wait_ready(port, bodies[args.images[0]], process)
        for n in args.images:
            asyncio.run(load(port, bodies[n], 8, args.warmup_s))
            for concurrency in args.concurrency:
                latencies, errors = asyncio.run(load(port, bodies[n], concurrency, args.duration_s))
                point = summarise(
                    name, n, concurrency, latencies=latencies, errors=errors,
                    duration_s=args.duration_s,
                )  # fmt: skip
                points.append(point)
                print(points[-1].line(), flush=True)
        memory = peak_rss_mb(process.pid)
    return points, memory


def report(points: list[Point], memory: dict[str, float]) -> None:
    """One row per server and load point: medians over rounds; a ratio is the median of the
    ratios within each round, so both servers' figures come from the same minutes."""
    groups: dict[tuple[str, int, int], list[Point]] = {}
    for p in points:
        groups.setdefault((p.server, p.images, p.concurrency), []).append(p)
    by_round = {(p.server, p.images, p.concurrency, p.round): p for p in points}
    print(
        "\n| images | concurrency | server | req/s | p50 ms | p99 ms | vs LitServe | vs minimal |"
    )
    print("|---:|---:|---|---:|---:|---:|---:|---:|")
    for (server, images, concurrency), group in groups.items():
        ratios = []
        for baseline in ("litserve", "minimal"):
            per_round = [
                p.requests_per_s / other.requests_per_s
                for p in group
                if (other := by_round.get((baseline, images, concurrency, p.round)))
                and other.requests_per_s
            ]
            ratios.append(median_ratio(per_round) if server == "marginwatch" else "")
        rate, p50, p99 = (statistics.median(getattr(p, field) for p in group)
                          for field in ("requests_per_s", "p50_ms", "p99_ms"))  # fmt: skip
        print(f"| {images} | {concurrency} | {server} | {rate:.0f} | {p50:.2f} | {p99:.2f} | "
              f"{ratios[0]} | {ratios[1]} |")  # fmt: skip
    print("\npeak resident memory: " + ", ".join(f"{k} {v:.0f} MB" for k, v in memory.items()))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS))
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32, 64])
    parser.add_argument("--images", nargs="+", type=int, default=[1, 32], help="images per request")
    parser.add_argument("--duration-s", type=float, default=3.0, help="seconds per measurement")
    parser.add_argument("--warmup-s", type=float, default=0.5, help="seconds of warm-up per body")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument(
        "--inline-max-samples", type=int, default=None,
        help="marginwatch: MARGINWATCH_INLINE_MAX_SAMPLES (batches this small run on the event "
        "loop, not in the model's thread); default: the service's own default",
    )  # fmt: skip
    parser.add_argument("--store", type=Path, default=None, help="artifact store to serve from")
    parser.add_argument(
        "--rounds", type=int, default=1,
        help="repeat the whole run this many times (servers still one at a time) and report "
        "medians: this machine's speed drifts by about 10 %% from minute to minute",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="write the points as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        store, model = choose_model(args.store, Path(scratch))
        print(f"model {model} from {store}; {os.cpu_count()} CPUs; ORT threads {args.threads}; "
              f"inline_max_samples {args.inline_max_samples or 'default'}")  # fmt: skip
        points: list[Point] = []
        memory: dict[str, float] = {}
        for round_ in range(args.rounds):
            for name in args.servers:
                measured, peak = measure(args, name, store, model)
                points += [replace(point, round=round_) for point in measured]
                memory[name] = max(peak, memory.get(name, 0.0))
    report(points, memory)
    if args.out:
        args.out.write_text(
            json.dumps({"points": [asdict(p) for p in points], "peak_rss_mb": memory}, indent=2)
        )


if __name__ == "__main__":
    main()
