"""Overload and memory: the real server at concurrency 1,000, beside stalled clients, and under its
worst legal load (docs/benchmarks.md, "Overload and memory").

    python bench/overload.py                   # all three parts, about 2 minutes
    python bench/overload.py --only load       # wrk at concurrency 64 and 1,000, 15 s each
    python bench/overload.py --only stalled    # 300 stalled connections and one good client
    python bench/overload.py --only memory     # peak RSS under the largest legal requests
    python bench/overload.py --only soak       # 10 minutes at concurrency 64: leaks, errors

**load**: wrk with its defaults (2 threads, 2 s time-out) posting one Fashion-MNIST image as
JSON, at concurrency 64 and then 1,000; a Lua script counts the statuses. Successful throughput is
the 200s per second. Prints the table and the targets: at 1,000, p99 ≤ 1 s, no time-outs, and
successful throughput ≥ 90 % of that at 64. (wrk leaves a request that timed out out of its
latency figures, so the time-outs are a target of their own.)

**stalled**: a client sends one-image requests back to back on one keep-alive connection, alone,
then while 300 other connections stall (100 send nothing, 100 half their headers, 100 half their
body), then after the read time-out has passed; prints its latency in each phase, the delay the
stalled connections cause, and how many of them the server closed.

**memory**: `--clients` connections send the largest legal requests back to back (64 images of
the longest JSON floats, 1.2 MB; then the same as binary FP32), then 48 send 16 MiB JSON bodies
(the issue's load); meanwhile a probe asks for `/v2/health/live` every 20 ms: its latency is how
long the event loop took to get to it. Prints the statuses, the probe's latency and the server's
peak resident memory (VmHWM, so cumulative) after each phase, against the 512 MiB container limit
of deploy/kubernetes.

**soak** (only with `--only soak`): wrk at concurrency 64 for `--soak-s` (600) in 30 s windows,
with traffic sampling on (rate 0.01, into the scratch folder); after each window the server's
resident memory, open descriptors and threads. Prints each window and the change from the
second window to the last: a leak shows as a trend.

The server is `python -m marginwatch.service` with its default settings (add `--env NAME=VALUE`),
one ONNX Runtime thread, the calibrated model in `artifacts/`. The file limit is raised for 1,000
connections (the process's hard limit must allow it). Needs `wrk` on the PATH.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson
from serve_load import (  # a sibling: Python puts a script's folder on the path
    choose_model,
    encode_request,
    free_port,
    peak_rss_mb,
    read_response,
    running,
    wait_ready,
)

from marginwatch.models.data import load_dataset

CONTAINER_LIMIT_MB = 512 * 1.048576  # deploy/kubernetes/deployment.yaml: 512Mi
WRK_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local file = io.open("{body}", "rb")
wrk.body = file:read("*a")
file:close()
local threads = {{}}
function setup(thread) table.insert(threads, thread) end
function init(args) statuses = {{}} end
function response(status, headers, body) statuses[status] = (statuses[status] or 0) + 1 end
function done(summary, latency, requests)
  local parts = {{}}
  for _, thread in ipairs(threads) do
    for status, count in pairs(thread:get("statuses")) do
      table.insert(parts, string.format('"%d": %d', status, count))
    end
  end
  local errors = summary.errors
  io.write(string.format('RESULT {{"statuses": [{{%s}}], "duration_us": %d, "requests": %d, ' ..
    '"timeouts": %d, "connect_errors": %d, "read_errors": %d, "write_errors": %d, ' ..
    '"p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d}}\\n',
    table.concat(parts, "}}, {{"), summary.duration, summary.requests, errors.timeout,
    errors.connect, errors.read, errors.write, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max))
end
"""


def raise_file_limit(needed: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        soft = hard if hard == resource.RLIM_INFINITY else min(max(needed, soft), hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft


def run_wrk(url: str, script: Path, connections: int, duration_s: int) -> dict[str, float]:
    """One wrk run: its RESULT line as numbers, statuses summed over its threads."""
    command = ["wrk", "-c", str(connections), "-d", f"{duration_s}s", "-s", str(script), url]
    return parse_wrk(subprocess.run(command, capture_output=True, text=True, check=True).stdout)


def parse_wrk(output: str) -> dict[str, float]:
    """The RESULT line that `WRK_LUA` makes wrk print, as numbers (statuses summed over its
    threads; `ok_per_s`: answers with status 200 per second; `socket_errors`: connect, read and
    write errors; `failed`: requests not answered 200, time-outs and socket errors). Shared with
    bench/peers.py and bench/grpc_floor.py."""
    line = next(line for line in output.splitlines() if line.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    statuses: dict[str, int] = {}
    for part in result.pop("statuses"):
        for status, count in part.items():
            statuses[status] = statuses.get(status, 0) + count
    seconds = result["duration_us"] / 1e6
    ok = statuses.get("200", 0)
    sockets = result["connect_errors"] + result["read_errors"] + result["write_errors"]
    return {**result, "seconds": seconds, "ok": ok, "ok_per_s": ok / seconds,
            "refused": statuses.get("503", 0),
            "other": sum(n for s, n in statuses.items() if s not in ("200", "503")),
            "socket_errors": sockets,
            "failed": result["requests"] - ok + result["timeouts"] + sockets}  # fmt: skip


def load_part(url: str, body: bytes, duration_s: int, scratch: Path) -> None:
    (scratch / "body.json").write_bytes(body)
    script = scratch / "post.lua"
    script.write_text(WRK_LUA.format(body=scratch / "body.json"))
    rows = {}
    for connections in (64, 1000):
        rows[connections] = run_wrk(url, script, connections, duration_s)
        print(f"  concurrency {connections}: {rows[connections]}  load average "
              f"{os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip
    print("\n| concurrency | requests | 200/s | 503 | other | p50 ms | p90 ms | p99 ms | max ms "
          "| time-outs | socket errors |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for connections, row in rows.items():
        print(f"| {connections} | {row['requests']:.0f} | {row['ok_per_s']:.0f} | "
              f"{row['refused']:.0f} | {row['other']:.0f} | {row['p50_us'] / 1e3:.1f} | "
              f"{row['p90_us'] / 1e3:.1f} | {row['p99_us'] / 1e3:.1f} | {row['max_us'] / 1e3:.1f} "
              f"| {row['timeouts']:.0f} | {row['socket_errors']:.0f} |")  # fmt: skip
    high, base = rows[1000], rows[64]
    ratio = high["ok_per_s"] / base["ok_per_s"]
    print(f"\nat 1,000: p99 {high['p99_us'] / 1e6:.3f} s (target ≤ 1 s: "
          f"{verdict(high['p99_us'] <= 1e6)}), time-outs {high['timeouts']:.0f} (target 0: "
          f"{verdict(high['timeouts'] == 0)}), successful throughput {ratio:.2f}× that at 64 "
          f"(target ≥ 0.90: {verdict(ratio >= 0.9)})")  # fmt: skip


def verdict(met: bool) -> str:
    return "met" if met else "missed"


def timed_requests(port: int, request: bytes, count: int) -> list[float]:
    """`count` requests back to back on one keep-alive connection: each one's seconds."""

    async def run() -> list[float]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        seconds = []
        for _ in range(count):
            started = time.perf_counter()
            writer.write(request)
            status = await read_response(reader)
            seconds.append(time.perf_counter() - started)
            if status != 200:
                raise RuntimeError(f"the well-behaved client got {status}")
        writer.close()
        return seconds

    return asyncio.run(run())


def stall(port: int, request: bytes, count: int) -> list[socket.socket]:
    """`count` connections: a third send nothing, a third half their headers, a third their
    headers and half their body."""
    head, _, body = request.partition(b"\r\n\r\n")
    partial = [b"", head[: len(head) // 2], head + b"\r\n\r\n" + body[: len(body) // 2]]
    sockets = []
    for index in range(count):
        connection = socket.create_connection(("127.0.0.1", port))
        connection.sendall(partial[index % 3])
        connection.setblocking(False)
        sockets.append(connection)
    return sockets


def closed(connection: socket.socket) -> bool:
    try:
        return connection.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def stalled_part(port: int, request: bytes, read_timeout_s: float, count: int = 300) -> None:
    phases = {"alone": timed_requests(port, request, 200)}
    sockets = stall(port, request, count)
    phases["300 stalled"] = timed_requests(port, request, 200)
    time.sleep(read_timeout_s + 1)
    shut = sum(closed(connection) for connection in sockets)
    phases["after the read time-out"] = timed_requests(port, request, 200)
    for connection in sockets:
        connection.close()
    print("\n| phase (200 requests each) | p50 ms | p99 ms | max ms |\n|---|---:|---:|---:|")
    for name, seconds in phases.items():
        ms = np.array(seconds) * 1e3
        print(f"| {name} | {np.median(ms):.2f} | {np.percentile(ms, 99):.2f} | {ms.max():.2f} |")
    delay = (max(phases["300 stalled"]) - statistics.median(phases["alone"])) * 1e3
    print(f"\nworst delay with 300 stalled connections: {delay:.1f} ms (target ≤ 100 ms: "
          f"{verdict(delay <= 100)}); the server closed {shut} of {count} after "
          f"{read_timeout_s:g} s + 1 s; load average {os.getloadavg()[0]:.2f}")  # fmt: skip


async def post_back_to_back(port: int, request: bytes, until: float, statuses: list[int]) -> None:
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while time.perf_counter() < until:
            writer.write(request)
            await writer.drain()
            statuses.append(await read_response(reader))
        writer.close()


async def probe(port: int, request: bytes, until: float, seconds: list[float]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    while time.perf_counter() < until:
        started = time.perf_counter()
        writer.write(request)
        await read_response(reader)
        seconds.append(time.perf_counter() - started)
        await asyncio.sleep(0.02)
    writer.close()


def heavy_phase(port: int, request: bytes, probe_request: bytes, clients: int, duration_s: float
                ) -> tuple[dict[int, int], list[float]]:  # fmt: skip
    statuses: list[int] = []
    latencies: list[float] = []

    async def run() -> None:
        until = time.perf_counter() + duration_s
        await asyncio.gather(probe(port, probe_request, until, latencies),
                             *(post_back_to_back(port, request, until, statuses)
                               for _ in range(clients)))  # fmt: skip

    asyncio.run(run())
    return {status: statuses.count(status) for status in sorted(set(statuses))}, latencies


def largest_requests(path_v1: str, path_v2: str, images: int) -> dict[str, bytes]:
    """The largest legal JSON request (the longest floats in [0, 1]), the same as binary, and a
    16 MiB JSON body of ordinary floats (about 4,300 images: too many for one request)."""
    tiny = np.full((images, 1, 28, 28), np.float32(1.1754944e-38), dtype=np.float32)
    raw = tiny.tobytes()
    header = orjson.dumps({"inputs": [{"name": "input", "shape": list(tiny.shape),
                                       "datatype": "FP32",
                                       "parameters": {"binary_data_size": len(raw)}}]})  # fmt: skip
    binary = encode_request(path_v2, header + raw).replace(
        b"\r\n\r\n", f"\r\nInference-Header-Content-Length: {len(header)}\r\n\r\n".encode(), 1
    )
    # "0.5," is 4 bytes, plus each image's brackets: just under the former 16 MiB limit
    huge = np.full((16 * 2**20 // 3200, 1, 28, 28), 0.5, dtype=np.float32)
    return {
        f"largest JSON ({images} images)": encode_request(
            path_v1, json.dumps({"inputs": tiny.tolist()}).encode()
        ),
        f"largest binary ({images} images)": binary,
        "16 MiB JSON (the issue's load)": encode_request(
            path_v1, orjson.dumps({"inputs": huge.tolist()})
        ),
    }


def memory_part(
    port: int, pid: int, model: str, probe_request: bytes, args: argparse.Namespace
) -> None:
    loads = largest_requests(f"/v1/models/{model}/predict", f"/v2/models/{model}/infer", 64)
    print(f"\nidle: peak RSS {peak_rss_mb(pid):.0f} MB")
    print("\n| load | clients | statuses | probe p99 ms | probe max ms | peak RSS MB |")
    print("|---|---:|---|---:|---:|---:|")
    for name, request in loads.items():
        count = 48 if name.startswith("16 MiB") else args.clients
        statuses, latencies = heavy_phase(
            port, request, probe_request, count, args.memory_duration_s
        )
        ms = np.array(latencies) * 1e3
        print(f"| {name}, {len(request) / 2**20:.2f} MiB | {count} | {statuses} | "
              f"{np.percentile(ms, 99):.1f} | {ms.max():.1f} | {peak_rss_mb(pid):.0f} |",
              flush=True)  # fmt: skip
    print(f"\ncontainer limit {CONTAINER_LIMIT_MB:.0f} MB; load average {os.getloadavg()[0]:.2f}")


def process_figures(pid: int) -> dict[str, float]:
    """Resident memory (MB), open descriptors and threads of the server now."""
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return {
        "rss_mb": int(status["VmRSS"].split()[0]) / 1024,
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": int(status["Threads"]),
    }


def soak_part(url: str, pid: int, body: bytes, soak_s: int, scratch: Path) -> None:
    """wrk at concurrency 64 in 30 s windows for `soak_s`; after each, the server's memory,
    descriptors and threads, so that a leak shows as a trend rather than a peak."""
    (scratch / "body.json").write_bytes(body)
    script = scratch / "post.lua"
    script.write_text(WRK_LUA.format(body=scratch / "body.json"))
    window_s = 30
    print("\n| window | 200/s | 503 | other | time-outs | p99 ms | RSS MB | fds | threads |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for window in range(max(1, soak_s // window_s)):
        row = run_wrk(url, script, 64, window_s) | process_figures(pid)
        rows.append(row)
        print(f"| {window + 1} | {row['ok_per_s']:.0f} | {row['refused']:.0f} | "
              f"{row['other']:.0f} | {row['timeouts']:.0f} | {row['p99_us'] / 1e3:.1f} | "
              f"{row['rss_mb']:.0f} | {row['fds']:.0f} | {row['threads']:.0f} |",
              flush=True)  # fmt: skip
    ok = sum(row["ok"] for row in rows)
    bad = sum(row["refused"] + row["other"] + row["timeouts"] for row in rows)
    settled, last = rows[min(1, len(rows) - 1)], rows[-1]  # the first window warms the caches
    print(f"\nsoak: {ok:.0f} × 200 and {bad:.0f} other answers or time-outs in "
          f"{len(rows) * window_s} s; resident memory {settled['rss_mb']:.0f} MB after the "
          f"second window, {last['rss_mb']:.0f} MB after the last "
          f"({last['rss_mb'] - settled['rss_mb']:+.0f} MB); descriptors {settled['fds']:.0f} → "
          f"{last['fds']:.0f}; threads {settled['threads']:.0f} → {last['threads']:.0f}; load "
          f"average {os.getloadavg()[0]:.2f}; traffic shards written: "
          f"{len(list((scratch / 'traffic').rglob('*.npz')))}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only", choices=("load", "stalled", "memory", "soak"), default=None,
        help="run one part (soak runs only when named)",
    )  # fmt: skip
    parser.add_argument(
        "--soak-s", type=int, default=600,
        help="soak: seconds of load in all (30 s windows; traffic sampling on at rate 0.01)",
    )  # fmt: skip
    parser.add_argument("--duration-s", type=int, default=15, help="seconds per wrk run")
    parser.add_argument("--clients", type=int, default=128, help="memory: connections")
    parser.add_argument("--memory-duration-s", type=float, default=15.0)
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="a MARGINWATCH_* setting for the server (repeatable)")  # fmt: skip
    args = parser.parse_args()
    parts = [args.only] if args.only else ["load", "stalled", "memory"]
    limit = raise_file_limit(4096)
    env = {"MARGINWATCH_INTRA_OP_THREADS": "1", **dict(item.split("=", 1) for item in args.env)}
    read_timeout_s = float(env.get("MARGINWATCH_READ_TIMEOUT_S", "5"))
    with tempfile.TemporaryDirectory() as scratch:
        if "soak" in parts:  # the writer thread and its files are part of what must not leak
            env.setdefault("MARGINWATCH_TRAFFIC_SAMPLE_RATE", "0.01")
            env.setdefault("MARGINWATCH_TRAFFIC_DIR", str(Path(scratch) / "traffic"))
        store, model = choose_model(None, Path(scratch))
        port = free_port()
        body = orjson.dumps(
            {"inputs": load_dataset("fashion-mnist-subset", "test").float_images[:1].tolist()}
        )
        path = f"/v1/models/{model}/predict"
        request = encode_request(path, body)
        live = b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        command = [sys.executable, "-m", "marginwatch.service", "--port", str(port),
                   "--store", str(store), "--models", model, "--log-level", "warning"]  # fmt: skip
        print(f"model {model}; {os.cpu_count()} CPUs; file limit {limit}; settings {env}; "
              f"load average {os.getloadavg()}", flush=True)  # fmt: skip
        with running(command, env) as process:
            wait_ready(port, request, process)
            if "load" in parts:
                load_part(f"http://127.0.0.1:{port}{path}", body, args.duration_s, Path(scratch))
            if "stalled" in parts:
                stalled_part(port, request, read_timeout_s)
            if "memory" in parts:
                memory_part(port, process.pid, model, live, args)
            if "soak" in parts:
                url = f"http://127.0.0.1:{port}{path}"
                soak_part(url, process.pid, body, args.soak_s, Path(scratch))
            print(f"\nserver peak resident memory: {peak_rss_mb(process.pid):.0f} MB")


if __name__ == "__main__":
    main()
