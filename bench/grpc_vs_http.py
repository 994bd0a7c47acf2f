"""The Open Inference Protocol over gRPC against the same protocol over HTTP, on one server.

One `marginwatch-serve` process with `--grpc-port`, so all transports reach the same registry,
batcher and model. For each body size (Fashion-MNIST test images) and concurrency, each transport
in turn sends requests back to back for `--duration-s`; the transports' order rotates from point
to point and round to round, and `--rounds` repeats everything (figures are medians, a ratio the
median of the per-round ratios: this machine's speed drifts from minute to minute). Transports:

- `http_json`: `POST /v2/models/{name}/infer` with the plain OIP v2 JSON body (`data` a flat
  list of numbers) and a JSON response: issue 21's reference for gRPC with binary tensors;
- `http_binary`: the same route with the binary tensor data extension (`binary_data_size`,
  `binary_data_output`), so that neither it nor gRPC pays for JSON numbers;
- `grpc`: `ModelInfer` with `raw_input_contents`, from `grpc.aio` on one channel (HTTP/2
  streams, as tritonclient uses it), the request serialised once and the response read as
  bytes: the leanest client gRPC allows.

HTTP goes through a lean asyncio HTTP/1.1 client (as `serve_load.py`'s: pre-encoded request, one
keep-alive connection per concurrent stream). The clients run in this process, on the server's
cores: their CPU per request is reported beside the server's. Requests are built with
tritonclient's stubs (Triton's proto, the same wire format), so this process never imports the
service's own (service/oip_grpc/README.md). One response of each transport is decoded and
compared before timing starts.

    python bench/grpc_vs_http.py                     # 1 and 32 images, concurrency 1, 8, 32, 64
    python bench/grpc_vs_http.py --images 1 --concurrency 8 32 64 --rounds 5 \\
        --out bench/results/grpc_vs_http.json

The model comes from `--store`, else from the default store (`artifacts/`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import grpc
import numpy as np
import orjson
from prometheus_client.parser import text_string_to_metric_families
from serve_load import (  # a sibling: Python puts a script's folder on the path
    free_port,
    median_ratio,
    running,
)
from tritonclient.grpc import service_pb2

from marginwatch.artifact.store import default_store, list_models
from marginwatch.models.data import load_dataset

INFER = "/inference.GRPCInferenceService/ModelInfer"
HEADER_LENGTH = "Inference-Header-Content-Length"
TRANSPORTS = ("http_json", "http_binary", "grpc")
DTYPES = {"FP32": "<f4", "INT64": "<i8", "BOOL": "?"}
# one request's outcome: None when it succeeded, else what went wrong (a status or a gRPC code)
Call = Callable[[], Awaitable[object | None]]


@dataclass
class Point:
    transport: str
    images: int
    concurrency: int
    round: int
    requests: int
    errors: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    server_cpu_us: float  # the server process's CPU time per request, all threads
    client_cpu_us: float  # this process's (the load generator's), on the same cores
    samples_per_batch: float  # how many samples the model's executions took on average
    load_average: float  # the machine's 1-minute load average as the point ended

    def line(self) -> str:
        return (
            f"  round {self.round} {self.transport:11s} images {self.images:2d} "
            f"conc {self.concurrency:2d}: {self.requests_per_s:7.0f} req/s  "
            f"p50 {self.p50_ms:6.2f} ms  p99 {self.p99_ms:6.2f} ms  "
            f"CPU µs/req server {self.server_cpu_us:5.0f} client {self.client_cpu_us:5.0f}  "
            f"{self.samples_per_batch:5.1f} samples/batch  errors {self.errors}  "
            f"load {self.load_average:.2f}"
        )


def cpu_seconds(pid: int) -> float:
    """User plus system time of a process so far, all its threads (/proc/<pid>/stat): it moves
    less than throughput when other work shares the cores."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def batch_totals(port: int, model: str) -> tuple[float, float]:
    """Batches the model has run and the samples in them, from the service's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    totals = {"count": 0.0, "sum": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples if family.name == "marginwatch_batch_size" else ():
            kind = sample.name.rsplit("_", 1)[1]
            if sample.labels.get("model") == model and kind in totals:
                totals[kind] = sample.value
    return totals["count"], totals["sum"]


def serving(
    store: Path, model: str, port: int, grpc_port: int
) -> AbstractContextManager[subprocess.Popen[bytes]]:
    command = [sys.executable, "-m", "marginwatch.service", "--port", str(port),
               "--grpc-port", str(grpc_port), "--store", str(store), "--models", model,
               "--reload-interval-s", "0", "--log-level", "warning"]  # fmt: skip
    return running(command, {"MARGINWATCH_INTRA_OP_THREADS": "1"})


# --- the three requests ----------------------------------------------------------------------


def http_head(model: str, length: int, extra: str = "") -> bytes:
    return (
        f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def json_request(model: str, batch: np.ndarray) -> bytes:
    """The plain OIP v2 JSON body, as a client without the binary extension sends it."""
    body = orjson.dumps(
        {"inputs": [{"name": "input", "shape": list(batch.shape), "datatype": "FP32",
                     "data": batch.ravel().tolist()}]}
    )  # fmt: skip
    return http_head(model, len(body), "Content-Type: application/json\r\n") + body


def binary_request(model: str, batch: np.ndarray) -> bytes:
    raw = batch.astype("<f4").tobytes()
    header = orjson.dumps(
        {
            "inputs": [
                {"name": "input", "shape": list(batch.shape), "datatype": "FP32",
                 "parameters": {"binary_data_size": len(raw)}}
            ],
            "parameters": {"binary_data_output": True},
        }
    )  # fmt: skip
    extra = f"Content-Type: application/octet-stream\r\n{HEADER_LENGTH}: {len(header)}\r\n"
    return http_head(model, len(header) + len(raw), extra) + header + raw


def grpc_request(model: str, batch: np.ndarray) -> bytes:
    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name="input", datatype="FP32", shape=batch.shape)
    request.raw_input_contents.append(batch.astype("<f4").tobytes())
    return bytes(request.SerializeToString())


REQUESTS = {"http_json": json_request, "http_binary": binary_request, "grpc": grpc_request}


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bytes]:
    """Status, head and body of one response with a Content-Length (all the service sends)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lower = head.lower()
    marker = lower.find(b"\r\ncontent-length:")  # not inference-header-content-length
    end = lower.find(b"\r\n", marker + 2)
    body = await reader.readexactly(int(lower[marker + 17 : end]))
    return int(head[9:12]), lower, body


async def http_caller(port: int, request: bytes) -> tuple[Call, Callable[[], None]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def call() -> object | None:
        writer.write(request)
        status, _, _ = await read_response(reader)
        return None if status == 200 else status

    return call, writer.close


async def grpc_caller(channel: grpc.aio.Channel, request: bytes) -> Call:
    infer = channel.unary_unary(INFER)  # bytes in, bytes out: no (de)serialisation per call

    async def call() -> object | None:
        try:
            await infer(request)
        except grpc.aio.AioRpcError as error:
            return error.code()
        return None

    return call


# --- checks and load -------------------------------------------------------------------------


async def http_answer(port: int, request: bytes) -> tuple[bytes, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    status, head, body = await read_response(reader)
    writer.close()
    assert status == 200, body[:300]
    return head, body


def binary_outputs(head: bytes, body: bytes) -> dict[str, np.ndarray]:
    marker = head.find(HEADER_LENGTH.lower().encode())
    length = int(head[marker + len(HEADER_LENGTH) + 1 : head.find(b"\r\n", marker)])
    offset = length
    outputs: dict[str, np.ndarray] = {}
    for output in orjson.loads(body[:length])["outputs"]:
        size = output["parameters"]["binary_data_size"]
        outputs[output["name"]] = np.frombuffer(
            body[offset : offset + size], DTYPES[output["datatype"]]
        )
        offset += size
    return outputs


async def check_all(port: int, grpc_port: int, model: str, batch: np.ndarray) -> None:
    """One request over each transport: the same labels and flags, or stop here."""
    answers = {
        "http_binary": binary_outputs(*await http_answer(port, binary_request(model, batch)))
    }
    _, body = await http_answer(port, json_request(model, batch))
    answers["http_json"] = {
        output["name"]: np.array(output["data"], DTYPES[output["datatype"]])
        for output in orjson.loads(body)["outputs"]
    }
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        raw = await channel.unary_unary(INFER)(grpc_request(model, batch))
    response = service_pb2.ModelInferResponse.FromString(raw)
    answers["grpc"] = {
        output.name: np.frombuffer(content, DTYPES[output.datatype])
        for output, content in zip(response.outputs, response.raw_output_contents, strict=True)
    }
    for name in ("label", "brittle"):
        for transport in ("http_json", "grpc"):
            assert np.array_equal(answers[transport][name], answers["http_binary"][name]), name


async def drive(calls: list[Call], duration_s: float) -> tuple[list[float], list[object]]:
    latencies: list[float] = []
    errors: list[object] = []
    deadline = time.perf_counter() + duration_s

    async def stream(call: Call) -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            outcome = await call()
            latencies.append(time.perf_counter() - started)
            if outcome is not None:
                errors.append(outcome)

    await asyncio.gather(*(stream(call) for call in calls))
    return latencies, errors


async def load(
    transport: str, ports: tuple[int, int], request: bytes, concurrency: int, duration_s: float
) -> tuple[list[float], list[object]]:
    if transport.startswith("http"):
        opened = [await http_caller(ports[0], request) for _ in range(concurrency)]
        try:
            return await drive([call for call, _ in opened], duration_s)
        finally:
            for _, close in opened:
                close()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{ports[1]}") as channel:
        calls = [await grpc_caller(channel, request) for _ in range(concurrency)]
        return await drive(calls, duration_s)


def measure(
    pid: int,
    transport: str,
    ports: tuple[int, int],
    request: bytes,
    *,
    model: str,
    concurrency: int,
    duration_s: float,
) -> Point:
    """One point (images and round left at 0 for the caller to fill in)."""
    batches_before, samples_before = batch_totals(ports[0], model)
    cpu_before, client_before = cpu_seconds(pid), time.process_time()
    latencies, errors = asyncio.run(load(transport, ports, request, concurrency, duration_s))
    served = max(1, len(latencies))
    client_us = (time.process_time() - client_before) * 1e6 / served
    cpu_us = (cpu_seconds(pid) - cpu_before) * 1e6 / served
    batches, samples = batch_totals(ports[0], model)
    per_batch = (samples - samples_before) / max(1.0, batches - batches_before)
    ms = np.array(latencies) * 1000
    return Point(
        transport, 0, concurrency, 0, len(latencies), len(errors),
        len(latencies) / duration_s, float(np.percentile(ms, 50)), float(np.percentile(ms, 99)),
        cpu_us, client_us, per_batch, os.getloadavg()[0],
    )  # fmt: skip


def wait_ready(ports: tuple[int, int], requests: dict[str, bytes]) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, ValueError):
            if not any(
                asyncio.run(load(transport, ports, requests[transport], 1, 0.01))[1]
                for transport in TRANSPORTS
            ):
                return
        time.sleep(0.2)
    raise RuntimeError("the server did not answer on both ports within 90 s")


# --- report ----------------------------------------------------------------------------------


def report(points: list[Point]) -> None:
    """Per transport: medians over the rounds; then gRPC against each HTTP transport, the median
    of the per-round ratios (each round's in brackets)."""
    groups: dict[tuple[int, int, str], list[Point]] = {}
    for point in points:
        groups.setdefault((point.images, point.concurrency, point.transport), []).append(point)
    print("\n| images | concurrency | transport | req/s | p50 ms | p99 ms | server CPU µs/req "
          "| client CPU µs/req | samples/batch |")  # fmt: skip
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    fields = ("requests_per_s", "p50_ms", "p99_ms", "server_cpu_us", "client_cpu_us",
              "samples_per_batch")  # fmt: skip
    for (images, concurrency, transport), group in groups.items():
        rate, p50, p99, cpu, client, per_batch = (
            statistics.median(getattr(p, field) for p in group) for field in fields
        )
        print(f"| {images} | {concurrency} | {transport} | {rate:.0f} | {p50:.2f} | {p99:.2f} | "
              f"{cpu:.0f} | {client:.0f} | {per_batch:.1f} |")  # fmt: skip
    by_round = {(p.images, p.concurrency, p.transport, p.round): p for p in points}
    print("\n| images | concurrency | gRPC / HTTP JSON req/s (rounds) | gRPC / HTTP binary req/s "
          "(rounds) | server CPU, gRPC / HTTP JSON | server CPU, gRPC / HTTP binary |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|")
    for images, concurrency in dict.fromkeys((p.images, p.concurrency) for p in points):
        columns = []
        for field, bold in (("requests_per_s", True), ("server_cpu_us", False)):
            for reference in ("http_json", "http_binary"):
                ratios = [
                    getattr(grpc_point, field) / getattr(other, field)
                    for grpc_point in groups.get((images, concurrency, "grpc"), [])
                    if (other := by_round.get((images, concurrency, reference, grpc_point.round)))
                ]
                columns.append(median_ratio(ratios, bold=bold, each_round=bold))
        print(f"| {images} | {concurrency} | {' | '.join(columns)} |")


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32, 64])
    parser.add_argument("--images", nargs="+", type=int, default=[1, 32], help="images per request")
    parser.add_argument("--duration-s", type=float, default=3.0, help="seconds per measurement")
    parser.add_argument("--warmup-s", type=float, default=0.5, help="seconds of warm-up per body")
    parser.add_argument("--rounds", type=int, default=3, help="repeats; figures are medians")
    parser.add_argument("--store", type=Path, default=None, help="artifact store to serve from")
    parser.add_argument("--out", type=Path, default=None, help="write the points as JSON here")
    args = parser.parse_args()
    args.store = args.store or default_store()
    models = list_models(args.store) if args.store.is_dir() else []
    if not models:
        parser.error(f"no model in {args.store}: pass --store with a published model")
    args.model = models[0]
    return args


def main() -> None:
    args = arguments()
    model, ports = args.model, (free_port(), free_port())
    images = load_dataset("fashion-mnist-subset", "test").float_images
    print(f"model {model} from {args.store}; {os.cpu_count()} CPUs; load average before "
          f"{os.getloadavg()[0]:.2f}")  # fmt: skip
    points: list[Point] = []
    with serving(args.store, model, *ports) as server:
        bodies = {n: {t: REQUESTS[t](model, images[:n]) for t in TRANSPORTS} for n in args.images}
        wait_ready(ports, bodies[args.images[0]])
        for n in args.images:
            asyncio.run(check_all(*ports, model, images[:n]))
        grid = [(n, c) for n in args.images for c in args.concurrency]
        for round_ in range(args.rounds):
            for index, (n, concurrency) in enumerate(grid):
                turn = (index + round_) % len(TRANSPORTS)  # each transport leads in turn
                for transport in TRANSPORTS[turn:] + TRANSPORTS[:turn]:
                    request = bodies[n][transport]
                    asyncio.run(load(transport, ports, request, concurrency, args.warmup_s))
                    point = measure(
                        server.pid, transport, ports, request, model=model,
                        concurrency=concurrency, duration_s=args.duration_s,
                    )  # fmt: skip
                    points.append(replace(point, images=n, round=round_))
                    print(points[-1].line(), flush=True)
    print(f"load average after {os.getloadavg()[0]:.2f}")
    report(points)
    if args.out:
        args.out.write_text(json.dumps({"points": [asdict(p) for p in points]}, indent=2))


if __name__ == "__main__":
    main()
