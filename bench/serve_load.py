"""The service under load on loopback, side by side with LitServe and a minimal FastAPI endpoint.

Same ONNX graph, same JSON body, same load generator: keep-alive connections send requests back
to back for `--duration-s` at each concurrency, for one-image and 32-image bodies. The body is
v1's `{"inputs": [...]}` (the baselines' `/predict`), or with `--api v2` one Open Inference
Protocol v2 JSON input tensor on `/v2/models/<model>/infer` of the service and the minimal
endpoint. The generator is a lean asyncio HTTP/1.1 client (pre-encoded request, Content-Length
framing) so that it costs the machine as little as possible; it stops by itself. Prints
throughput, p50/p99 latency, each server's CPU time per request (all its threads, from /proc),
the ratios of throughput and of p99 against each baseline (per round, and their median), and
each server's peak resident memory.

The servers all start once and take turns at each load point, round after round (one at a
time: an idle server costs the others nothing), so that a ratio compares measurements seconds
apart: on a machine shared with other work, load drifts from one second to the next, and rounds
that ran each server for a minute of its own moved by ±20 %. `--tree LABEL=PATH` adds the
service of another checkout (a previous commit, say) as `marginwatch@LABEL`.

    python bench/serve_load.py                       # everything, about 2 minutes
    python bench/serve_load.py --servers marginwatch --concurrency 1 --images 1
    python bench/serve_load.py --servers marginwatch minimal --api v2 --images 1 \
        --rounds 9 --duration-s 1                    # the OIP v2 comparison

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
    cpu_us_per_request: float = 0.0  # the server process's CPU time (all threads) per request

    def line(self) -> str:
        return (
            f"  {self.server:12s} images {self.images:3d} conc {self.concurrency:3d}: "
            f"{self.requests_per_s:8.0f} req/s  p50 {self.p50_ms:7.2f} ms  "
            f"p99 {self.p99_ms:7.2f} ms  errors {self.errors}"
        ) + (f"  CPU {self.cpu_us_per_request:5.0f} µs" if self.cpu_us_per_request else "")


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
    command = [sys.executable, str(script), "--onnx", onnx, "--port", str(port),
               "--threads", str(threads)]  # fmt: skip
    return [*command, "--model", model] if name == "minimal" else command


def request_path(api: str, name: str, model: str) -> str:
    """The inference route a server is sent `api`'s body on (LitServe takes v1's only)."""
    if api == "v2":
        return f"/v2/models/{model}/infer"
    return f"/v1/models/{model}/predict" if name == "marginwatch" else "/predict"


def request_body(api: str, images: np.ndarray) -> bytes:
    """`images` as `api`'s JSON body: v1's `{"inputs": [...]}` (nested lists), or one Open
    Inference Protocol v2 input tensor with flat `data`, as tritonclient sends it."""
    if api == "v1":
        return orjson.dumps({"inputs": images.tolist()})
    tensor = {"name": "input", "shape": list(images.shape), "datatype": "FP32",
              "data": images.ravel().tolist()}  # fmt: skip
    return orjson.dumps({"inputs": [tensor]})


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
def running(
    command: list[str], env_extra: dict[str, str], cwd: Path = PROJECT
) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env_extra}
    process = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, start_new_session=True
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


def server_env(args: argparse.Namespace) -> dict[str, str]:
    env = {"MARGINWATCH_INTRA_OP_THREADS": str(args.threads)}
    if args.inline_max_samples is not None:
        env["MARGINWATCH_INLINE_MAX_SAMPLES"] = str(args.inline_max_samples)
    return env


@dataclass
class Started:
    """A running server, and its pre-encoded requests by image count."""

    name: str
    port: int
    process: subprocess.Popen[bytes]
    bodies: dict[int, bytes]


def start(
    args: argparse.Namespace, names: Sequence[str], stack: contextlib.ExitStack, store: Path,
    model: str,
) -> list[Started]:  # fmt: skip
    """The servers `names` started (each on its own port; `marginwatch@LABEL` from the checkout
    that `--tree LABEL=PATH` names) and answering."""
    images = load_dataset("fashion-mnist-subset", "test").float_images
    started = []
    for name in names:
        port = free_port()
        service, _, label = name.partition("@")
        # the service from another checkout runs in its folder: `python -m` imports from there
        cwd = Path(dict(args.tree)[label]) if label else PROJECT
        command = server_command(service, store, model, port, args.threads)
        process = stack.enter_context(running(command, server_env(args), cwd))
        path = request_path(args.api, service, model)
        bodies = {n: encode_request(path, request_body(args.api, images[:n])) for n in args.images}
        started.append(Started(name, port, process, bodies))
    for server in started:
        wait_ready(server.port, server.bodies[args.images[0]], server.process)
    return started


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of the process, all its threads, so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure_round(args: argparse.Namespace, servers: Sequence[Started], round_: int) -> list[Point]:
    """One round: at each load point, each server in turn, in the order given."""
    points = []
    for n in args.images:
        for server in servers:
            asyncio.run(load(server.port, server.bodies[n], 8, args.warmup_s))
        for concurrency in args.concurrency:
            for server in servers:
                cpu = cpu_seconds(server.process.pid)
                latencies, errors = asyncio.run(
                    load(server.port, server.bodies[n], concurrency, args.duration_s)
                )
                cpu = cpu_seconds(server.process.pid) - cpu
                point = summarise(
                    server.name, n, concurrency, latencies=latencies, errors=errors,
                    duration_s=args.duration_s,
                )  # fmt: skip
                used = cpu / max(1, point.requests) * 1e6
                points.append(replace(point, round=round_, cpu_us_per_request=used))
                print(f"{points[-1].line()}  round {round_}", flush=True)
    return points


def measure(
    args: argparse.Namespace, names: Sequence[str], store: Path, model: str
) -> tuple[list[Point], dict[str, float]]:
    """Every round of every server: all of them start once and take turns at each load point
    (the order reversed every other round), so a server's figures and its baseline's come from
    the same few seconds however the machine's other load drifts. A server waiting for its turn
    is idle: the servers never share the cores."""
    points: list[Point] = []
    with contextlib.ExitStack() as stack:
        started = start(args, names, stack, store, model)
        for round_ in range(args.rounds):
            points += measure_round(args, started if round_ % 2 == 0 else started[::-1], round_)
        memory = {server.name: peak_rss_mb(server.process.pid) for server in started}
    return points, memory


BASELINES = ("litserve", "minimal")


def round_ratios(group: list[Point], by_round: dict[tuple[str, int, int, int], Point],
                 baseline: str, field: str = "requests_per_s") -> list[float]:  # fmt: skip
    """Each round's ratio of `field` between the points of `group` and `baseline`'s."""
    return [
        getattr(p, field) / getattr(other, field)
        for p in group
        if (other := by_round.get((baseline, p.images, p.concurrency, p.round)))
        and getattr(other, field)
    ]


def report(points: list[Point], memory: dict[str, float]) -> None:
    """One row per server and load point: medians over rounds; a ratio is the median of the
    ratios within each round, so both servers' figures come from the same minutes. For the
    servers that are not baselines: the ratios of throughput and of p99 latency against each
    baseline that ran."""
    groups: dict[tuple[str, int, int], list[Point]] = {}
    for p in points:
        groups.setdefault((p.server, p.images, p.concurrency), []).append(p)
    by_round = {(p.server, p.images, p.concurrency, p.round): p for p in points}
    ran = [b for b in BASELINES if any(p.server == b for p in points)]
    columns = "".join(f" vs {b} | p99 vs {b} |" for b in ran)
    print(f"\n| images | concurrency | server | req/s | p50 ms | p99 ms | CPU µs/req |{columns}")
    print("|---:|---:|---|---:|---:|---:|---:|" + "---:|---:|" * len(ran))
    for (server, images, concurrency), group in groups.items():
        cells = ""
        for baseline in ran:
            if server in BASELINES:
                cells += " | |"
                continue
            rates = median_ratio(round_ratios(group, by_round, baseline))
            p99s = median_ratio(round_ratios(group, by_round, baseline, "p99_ms"))
            cells += f" {rates} | {p99s} |"
        rate, p50, p99, cpu = (statistics.median(getattr(p, field) for p in group)
                               for field in ("requests_per_s", "p50_ms", "p99_ms",
                                             "cpu_us_per_request"))  # fmt: skip
        print(f"| {images} | {concurrency} | {server} | {rate:.0f} | {p50:.2f} | {p99:.2f} | "
              f"{cpu:.0f} |{cells}")  # fmt: skip
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
        "--api", choices=("v1", "v2"), default="v1",
        help="v1: `{\"inputs\": [...]}` on the service's /v1 route and the baselines' /predict; "
        "v2: one OIP v2 JSON input tensor on /v2/models/<model>/infer (not LitServe)",
    )  # fmt: skip
    parser.add_argument(
        "--rounds", type=int, default=1,
        help="repeat the whole run this many times and report medians: this machine's speed "
        "drifts from second to second",
    )  # fmt: skip
    parser.add_argument(
        "--tree", action="append", default=[], type=lambda text: tuple(text.split("=", 1)),
        metavar="LABEL=PATH",
        help="also run the service from the checkout at PATH, as server marginwatch@LABEL "
        "(say, the previous commit: `git worktree add PATH HEAD~1`); repeatable",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="write the points as JSON here")
    args = parser.parse_args()
    if args.api == "v2" and "litserve" in args.servers:
        parser.error("--api v2: the LitServe baseline takes v1 bodies only (--servers ...)")
    with tempfile.TemporaryDirectory() as scratch:
        store, model = choose_model(args.store, Path(scratch))
        print(f"model {model} from {store}; {os.cpu_count()} CPUs; ORT threads {args.threads}; "
              f"inline_max_samples {args.inline_max_samples or 'default'}")  # fmt: skip
        names = [*args.servers, *(f"marginwatch@{label}" for label, _ in args.tree)]
        points, memory = measure(args, names, store, model)
    report(points, memory)
    if args.out:
        args.out.write_text(
            json.dumps({"points": [asdict(p) for p in points], "peak_rss_mb": memory}, indent=2)
        )


if __name__ == "__main__":
    main()
