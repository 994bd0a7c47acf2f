"""How far gRPC at one image can go here: grpcio's own per-call floor beside the service (issue 21).

Issue 21 wants gRPC with binary tensors at HTTP JSON's throughput at one image. Three transports,
driven by load generators of equal (C-level) cost, say whether grpcio allows it on this machine:

- `grpc`: the service's `ModelInfer` (`marginwatch-serve --grpc-port`, one ONNX Runtime thread),
  the first Fashion-MNIST test image as FP32 [1,1,28,28] in `raw_input_contents`, from h2load on
  one HTTP/2 connection with `--concurrency` streams (as a gRPC channel multiplexes calls);
- `grpc_empty`: grpcio's floor, a grpc.aio server (uvloop where importable, the garbage collector
  tuned as the service's) whose generic handler takes the same message as bytes and returns a
  constant small `ModelInferResponse`, driven the same way;
- `http_json`: the same service process's `POST /v2/models/{name}/infer` with the OIP v2 JSON body
  of bench/serve_load.py, from wrk (one thread, `--concurrency` connections, overload.py's Lua).

Before timing, a grpcio call must get the label HTTP JSON gives, and the empty server must answer.
h2load reads no grpc-status, so the server's own count checks each gRPC point: the service's
`marginwatch_requests_total` (endpoint `grpc_model_infer`) or the empty server's call count must
cover h2load's successes; a shortfall, or more non-2xx calls than the streams h2load cancels at
its end, counts as errors. Each point runs its generator `--warmup-s` unmeasured first (h2load's
`--warm-up-time` would put calls in the server's count that h2load's leaves out), then
`--duration-s`; server CPU per request is the server's user+system time (all threads,
/proc/<pid>/stat) over the measured run divided by its successful requests. The transports'
order rotates from point to point and round to round; figures are medians over `--rounds`, a
ratio the median of the per-round ratios (each round's in brackets).

    .venv/bin/python bench/grpc_floor.py                    # concurrency 8 32 64, 3 rounds: ~3 min
    .venv/bin/python bench/grpc_floor.py --rounds 5 --out bench/results/grpc_floor.json
    .venv/bin/python bench/grpc_floor.py --rounds 1 --duration-s 2 --concurrency 8   # a look

Needs h2load (apt-get install nghttp2-client) and wrk (apt-get install wrk) on the PATH.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import numpy as np
import orjson
from grpc_vs_http import DTYPES, INFER, cpu_seconds, grpc_request, serving  # siblings
from overload import WRK_LUA, parse_wrk
from peers import PROJECT, shown_path
from prometheus_client.parser import text_string_to_metric_families
from serve_load import free_port, median_ratio, request_body, running
from tritonclient.grpc import service_pb2

from marginwatch.artifact.store import current_dir, default_store, list_models
from marginwatch.models.data import load_dataset
from marginwatch.service.runtime import tune_garbage_collector

SERVICE = "inference.GRPCInferenceService"
CALLS = f"/{SERVICE}/Calls"  # the empty server's call count, for the server-side check
TRANSPORTS = ("grpc", "grpc_empty", "http_json")
EMPTY_ANSWER = service_pb2.ModelInferResponse(model_name="grpc_empty").SerializeToString()
H2LOAD_RATE = re.compile(r"finished in \S+, ([\d.]+) req/s")
H2LOAD_COUNTS = re.compile(r"requests: .* (\d+) succeeded, (\d+) failed")


@dataclass
class Point:
    transport: str
    concurrency: int
    round: int
    requests: int  # successful answers in the measured run
    errors: int  # failed streams or responses, and (gRPC) calls the server did not confirm
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    server_cpu_us: float  # the server's CPU time per answered request, all threads
    load_average: float  # the 1-minute load average when the point ended

    def line(self) -> str:
        return (f"  round {self.round + 1} {self.transport:10s} conc {self.concurrency:3d}: "
                f"{self.requests_per_s:7.0f} req/s  p50 {self.p50_ms:6.2f} ms  p99 "
                f"{self.p99_ms:6.2f} ms  server CPU {self.server_cpu_us:4.0f} µs/req  errors "
                f"{self.errors}  load {self.load_average:.2f}")  # fmt: skip


@dataclass
class Bench:
    args: argparse.Namespace
    ports: dict[str, int]  # per transport; http_json's is the service's HTTP port
    http_path: str
    scratch: Path  # the bodies, wrk's script, h2load's log


def serve_empty(port: int) -> None:
    """grpcio's floor: the message arrives as bytes and a constant answer goes back."""
    calls = 0

    async def infer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        nonlocal calls
        calls += 1
        return EMPTY_ANSWER

    async def count(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return str(calls).encode()

    # the service's collector tuning (service/runtime.py): this process imported numpy, ONNX
    # Runtime and the rest for the client side, whose objects full collections would walk
    tune_garbage_collector()

    async def main() -> None:
        handlers = {"ModelInfer": grpc.unary_unary_rpc_method_handler(infer),
                    "Calls": grpc.unary_unary_rpc_method_handler(count)}  # fmt: skip
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())


def call(port: int, method: str, message: bytes) -> bytes:
    """One grpcio call, bytes in and out, waiting up to 90 s for the server to listen."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        return bytes(stub(message, timeout=90, wait_for_ready=True))


def http_label(port: int, path: str, body: bytes) -> list[int]:
    """The label of an HTTP JSON answer, retried until the service has loaded (90 s)."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                outputs = orjson.loads(response.read())["outputs"]
            return next(list(o["data"]) for o in outputs if o["name"] == "label")
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def check(ports: dict[str, int], http_path: str, bodies: dict[str, bytes]) -> None:
    expected = http_label(ports["http_json"], http_path, bodies["http_json"])
    response = service_pb2.ModelInferResponse.FromString(call(ports["grpc"], INFER, bodies["grpc"]))
    index = [o.name for o in response.outputs].index("label")
    output = response.outputs[index]
    got = np.frombuffer(response.raw_output_contents[index], DTYPES[output.datatype]).tolist()
    if got != expected:
        raise SystemExit(f"grpc_floor.py: gRPC label {got} != HTTP JSON label {expected}")
    empty = call(ports["grpc_empty"], INFER, bodies["grpc"])
    if service_pb2.ModelInferResponse.FromString(empty).model_name != "grpc_empty":
        raise SystemExit("grpc_floor.py: the empty gRPC server gave an unexpected answer")
    print(f"checked: label {expected} over HTTP JSON and gRPC; the empty server answers")


def server_counts(transport: str, ports: dict[str, int]) -> tuple[int, int]:
    """Calls the server has answered with success and without, so far."""
    if transport == "grpc_empty":
        return int(call(ports["grpc_empty"], CALLS, b"")), 0
    with urllib.request.urlopen(f"http://127.0.0.1:{ports['http_json']}/metrics") as response:
        text = response.read().decode()
    counts = {True: 0, False: 0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples if family.name == "marginwatch_requests" else ():
            if sample.labels.get("endpoint") == "grpc_model_infer":
                counts[sample.labels.get("status_class") == "2xx"] += int(sample.value)
    return counts[True], counts[False]


def h2load(
    port: int, body: Path, concurrency: int, seconds: int, log: Path | None = None
) -> tuple[float, int, int]:
    """One connection (a channel), `concurrency` streams: successes/s, successes, failures."""
    line = ["h2load", "-t", "1", "-c", "1", "-m", str(concurrency), "-D", str(seconds),
            "--data", str(body), "-H", "content-type: application/grpc", "-H", "te: trailers",
            f"http://127.0.0.1:{port}{INFER}"]  # fmt: skip
    if log is not None:  # rows: start (µs since the epoch), HTTP status, µs to the response's end
        log.unlink(missing_ok=True)  # this run's rows only
        line[1:1] = ["--log-file", str(log)]
    output = generate(line, seconds)
    rate, counts = H2LOAD_RATE.search(output), H2LOAD_COUNTS.search(output)
    if rate is None or counts is None:
        raise SystemExit(f"grpc_floor.py: h2load said: {output[-300:]}")
    # successes are HTTP 200s: h2load reads no grpc-status
    return float(rate.group(1)), int(counts.group(1)), int(counts.group(2))


def generate(line: list[str], seconds: int) -> str:
    done = subprocess.run(line, capture_output=True, text=True, timeout=seconds + 60, check=False)
    if done.returncode != 0:
        raise SystemExit(f"grpc_floor.py: {line[0]} failed: {(done.stderr + done.stdout)[-300:]}")
    return done.stdout


def wrk(port: int, path: str, script: Path, concurrency: int, seconds: int) -> dict[str, float]:
    line = ["wrk", "-t", "1", "-c", str(concurrency), "-d", f"{seconds}s", "--timeout", "30s",
            "-s", str(script), f"http://127.0.0.1:{port}{path}"]  # fmt: skip
    output = generate(line, seconds)
    if "RESULT " not in output:
        raise SystemExit(f"grpc_floor.py: wrk said: {output[-300:]}")
    return parse_wrk(output)


def grpc_point(bench: Bench, transport: str, concurrency: int, pid: int) -> Point:
    port, body, log = bench.ports[transport], bench.scratch / "grpc.body", bench.scratch / "log"
    h2load(port, body, concurrency, bench.args.warmup_s)
    (ok_before, other_before), cpu_before = server_counts(transport, bench.ports), cpu_seconds(pid)
    rate, succeeded, failed = h2load(port, body, concurrency, bench.args.duration_s, log)
    cpu = cpu_seconds(pid) - cpu_before
    time.sleep(0.2)  # the calls h2load cancelled at its end are counted as they finish
    ok_after, other_after = server_counts(transport, bench.ports)
    unconfirmed = max(0, succeeded - (ok_after - ok_before))
    refused = max(0, other_after - other_before - concurrency)  # beyond h2load's cancelled calls
    rows = np.loadtxt(log, dtype=np.int64, ndmin=2)
    ms = rows[rows[:, 1] == 200, 2] / 1e3
    return Point(transport, concurrency, 0, succeeded, failed + unconfirmed + refused, rate,
                 float(np.percentile(ms, 50)), float(np.percentile(ms, 99)),
                 cpu * 1e6 / max(1, succeeded), os.getloadavg()[0])  # fmt: skip


def http_point(bench: Bench, concurrency: int, pid: int) -> Point:
    script, port = bench.scratch / "post.lua", bench.ports["http_json"]
    wrk(port, bench.http_path, script, concurrency, bench.args.warmup_s)
    cpu_before = cpu_seconds(pid)
    result = wrk(port, bench.http_path, script, concurrency, bench.args.duration_s)
    cpu = cpu_seconds(pid) - cpu_before
    return Point("http_json", concurrency, 0, int(result["ok"]), int(result["failed"]),
                 result["ok_per_s"], result["p50_us"] / 1e3, result["p99_us"] / 1e3,
                 cpu * 1e6 / max(1.0, result["requests"]), os.getloadavg()[0])  # fmt: skip


def run_rounds(bench: Bench, pids: dict[str, int]) -> list[Point]:
    points: list[Point] = []
    for round_ in range(bench.args.rounds):
        for index, concurrency in enumerate(bench.args.concurrency):
            turn = (index + round_) % len(TRANSPORTS)  # each transport leads in turn
            for transport in TRANSPORTS[turn:] + TRANSPORTS[:turn]:
                if transport == "http_json":
                    point = http_point(bench, concurrency, pids[transport])
                else:
                    point = grpc_point(bench, transport, concurrency, pids[transport])
                point.round = round_
                points.append(point)
                print(point.line(), flush=True)
    return points


def table(points: list[Point], concurrency: list[int]) -> list[str]:
    """Per concurrency and transport: medians over rounds, and req/s ÷ http_json's per round."""
    rows = ["| transport | conc | req/s | p50 ms | p99 ms | server CPU µs/req "
            "| req/s ÷ http_json (rounds) |", "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    http = {(p.concurrency, p.round): p for p in points if p.transport == "http_json"}
    for conc in concurrency:
        for transport in TRANSPORTS:
            group = [p for p in points if p.transport == transport and p.concurrency == conc]
            rate, p50, p99, cpu = (statistics.median(getattr(p, field) for p in group)
                                   for field in ("requests_per_s", "p50_ms", "p99_ms",
                                                 "server_cpu_us"))  # fmt: skip
            ratios = [p.requests_per_s / ref.requests_per_s for p in group
                      if transport != "http_json" and (ref := http.get((conc, p.round)))
                      and ref.requests_per_s]  # fmt: skip
            rows.append(f"| {transport} | {conc} | {rate:.0f} | {p50:.2f} | {p99:.2f} | "
                        f"{cpu:.0f} | {median_ratio(ratios, bold=True)} |")  # fmt: skip
    return rows


def machine() -> dict[str, object]:
    """The machine's state and the versions of what runs."""

    def first_line(command: list[str]) -> str:
        done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=PROJECT)
        return (done.stdout or done.stderr).strip().splitlines()[0].split(" [")[0]

    try:
        import uvloop

        loop = f"uvloop {uvloop.__version__}"
    except ImportError:
        loop = "asyncio's own (uvloop is not installed)"
    return {"nproc": os.cpu_count(), "cpus": sorted(os.sched_getaffinity(0)),
            "load_average": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M %Z"),
            "commit": first_line(["git", "describe", "--always", "--dirty"]),
            "python": sys.version.split()[0], "grpcio": grpc.__version__,
            "grpc_empty_loop": loop, "h2load": first_line(["h2load", "--version"]),
            "wrk": first_line(["wrk", "-v"])}  # fmt: skip


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="grpc_floor.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    add = parser.add_argument
    add("--concurrency", nargs="+", type=int, default=[8, 32, 64],
        help="h2load's streams on its one connection, wrk's connections")  # fmt: skip
    add("--duration-s", type=int, default=5, help="measured seconds per point (whole seconds)")
    add("--warmup-s", type=int, default=1, help="seconds of the same load before each point")
    add("--rounds", type=int, default=3, help="repeats of every point; figures are medians")
    add("--out", type=Path, help="write the command, machine state, versions and points as JSON")
    add("--serve-empty", type=int, metavar="PORT", help=argparse.SUPPRESS)  # the empty server
    args = parser.parse_args()
    problem = None
    if min(args.rounds, args.duration_s, args.warmup_s, *args.concurrency) < 1:
        problem = "--rounds, --duration-s, --warmup-s and --concurrency must be at least 1"
    for tool, package in (("wrk", "wrk"), ("h2load", "nghttp2-client")):
        if args.serve_empty is None and shutil.which(tool) is None:
            problem = f"{tool} is not on the PATH: apt-get install {package} is needed"
    if problem:
        print(f"grpc_floor.py: {problem}", file=sys.stderr)
        raise SystemExit(2)
    return args


def write_scratch(scratch: Path, bodies: dict[str, bytes]) -> None:
    """h2load's body (gRPC's framing: not compressed, the length, the message) and wrk's."""
    message = bodies["grpc"]
    (scratch / "grpc.body").write_bytes(b"\x00" + len(message).to_bytes(4, "big") + message)
    (scratch / "body.json").write_bytes(bodies["http_json"])
    (scratch / "post.lua").write_text(WRK_LUA.format(body=scratch / "body.json"))


def write_record(
    args: argparse.Namespace, state: dict[str, object], model: str, points: list[Point]
) -> None:
    settings = {k: v for k, v in vars(args).items() if k != "serve_empty"}
    record = {"command": [shown_path(a) if "/" in a else a for a in sys.argv], "machine": state,
              "model": model, "settings": settings | {"out": shown_path(args.out)},
              "points": [asdict(p) for p in points]}  # fmt: skip
    args.out.write_text(json.dumps(record, indent=2, default=str))


def main() -> None:
    args = parse_args()
    if args.serve_empty is not None:
        serve_empty(args.serve_empty)
        return
    state = machine()
    print(f"load average at the start {state['load_average']}\nmachine: {state}", flush=True)
    store = default_store()
    models = list_models(store) if store.is_dir() else []
    if not models:
        print(f"grpc_floor.py: no model in {store}: calibrate one first", file=sys.stderr)
        raise SystemExit(2)
    model, image = models[0], load_dataset("fashion-mnist-subset", "test").float_images[:1]
    version = f"{model}/{current_dir(store, model).name}"
    ports = {"http_json": free_port(), "grpc": free_port(), "grpc_empty": free_port()}
    with tempfile.TemporaryDirectory() as folder:
        bench = Bench(args, ports, f"/v2/models/{model}/infer", Path(folder))
        bodies = {"http_json": request_body("v2", image), "grpc": grpc_request(model, image)}
        write_scratch(bench.scratch, bodies)
        empty = [sys.executable, __file__, "--serve-empty", str(ports["grpc_empty"])]
        with (serving(store, model, ports["http_json"], ports["grpc"]) as service,
              running(empty, {}) as floor):  # fmt: skip
            print(f"model {version}; service pid {service.pid}, empty gRPC server pid "
                  f"{floor.pid}", flush=True)  # fmt: skip
            check(ports, bench.http_path, bodies)
            pids = {"grpc": service.pid, "http_json": service.pid, "grpc_empty": floor.pid}
            points = run_rounds(bench, pids)
    state["load_average_end"] = os.getloadavg()
    print(f"load average at the end {state['load_average_end']}")
    print("\n" + "\n".join(table(points, args.concurrency)))
    if args.out:
        write_record(args, state, version, points)


if __name__ == "__main__":
    main()
