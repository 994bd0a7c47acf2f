"""Where the microseconds go: the concurrency-1 request path of the service and of the minimal
endpoint (`bench/minimal_baseline.py`), stage by stage.

Both ASGI apps run in this process, each behind uvicorn's own HTTP protocol (httptools; the
service behind its `protocol.py` subclass, as `marginwatch-serve` runs it) over an in-memory
transport: the HTTP parsing and response writing of the real server, without the sockets, the
kernel or the load generator, which cost both servers the same and, on a shared machine, move
by more than the differences measured here. One request at a time, the same one-image body.

Stage timers: the functions that mark each stage's boundaries are wrapped (in this process only)
with `perf_counter_ns` clocks that keep each stage's own time, its callees' taken out, and the
median per stage over all requests is printed (a request the scheduler interrupted moves no
median). Rounds alternate between the apps, and each round also runs every app with no clock at
all: the totals printed are those, as the thread's CPU time per request, which the time the
scheduler gives other processes does not inflate; "clocks" is what the wrappers themselves add.
Run it from another checkout's folder (`PYTHONPATH=<checkout>`) to profile that one.

    OMP_NUM_THREADS=1 .venv/bin/python bench/request_profile.py [--requests 1000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Any

import onnxruntime as ort
import orjson
import uvicorn
from asgi_overhead import MODEL, App, paths, request_body, start_lifespan
from minimal_baseline import build_app
from serve_load import encode_request
from starlette.requests import Request
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from marginwatch.artifact.schema import ONNX_FILE
from marginwatch.artifact.store import current_dir, default_store
from marginwatch.service import routes_v2
from marginwatch.service.app import create_app
from marginwatch.service.batcher import MicroBatcher
from marginwatch.service.engine import ServedModel
from marginwatch.service.metrics import ServiceMetrics
from marginwatch.service.middleware import AdmissionGuard, RequestMetricsMiddleware
from marginwatch.service.payload import RequestReader
from marginwatch.service.protocol import timed_protocol
from marginwatch.service.runtime import tune_garbage_collector
from marginwatch.service.settings import Settings


class MemoryTransport(asyncio.Transport):
    """A connection whose bytes go nowhere: what the protocol writes is counted, not sent."""

    def __init__(self) -> None:
        super().__init__()
        self.written = 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(
            name, default
        )

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += len(data)

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass  # uvicorn's keep-alive time-out, while another app is measured: nothing to close


@dataclass
class Connection:
    """One app behind one uvicorn protocol instance, fed whole requests."""

    name: str
    protocol: HttpToolsProtocol
    request: bytes

    async def one(self) -> None:
        self.protocol.data_received(self.request)
        (task,) = self.protocol.tasks
        await task


def connect(name: str, app: App, protocol_class: type[HttpToolsProtocol], request: bytes,
            *, server_header: bool) -> Connection:  # fmt: skip
    config = uvicorn.Config(app, http=protocol_class, access_log=False, lifespan="off",
                            log_level="warning", server_header=server_header)  # fmt: skip
    config.load()
    state = ServerState()
    # what uvicorn's `Server.on_tick` sets, once a second
    date = [(b"date", formatdate(time.time(), usegmt=True).encode())]
    state.default_headers = date + config.encoded_headers
    protocol = protocol_class(config=config, server_state=state, app_state={})  # type: ignore[arg-type]
    protocol.connection_made(MemoryTransport())
    return Connection(name, protocol, request)


# --- the stage clocks -----------------------------------------------------------------------


@dataclass
class Clocks:
    """Exclusive time per stage for the request in progress, and the kept requests' times."""

    running: list[list[int]] = field(default_factory=list)  # [started, callees' time] per frame
    current: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    kept: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    def enter(self) -> list[int]:
        frame = [time.perf_counter_ns(), 0]
        self.running.append(frame)
        return frame

    def leave(self, stage: str, frame: list[int]) -> None:
        elapsed = time.perf_counter_ns() - frame[0]
        self.running.pop()
        self.current[stage] += elapsed - frame[1]
        if self.running:
            self.running[-1][1] += elapsed

    def end_request(self, total_ns: int, stages: list[str]) -> None:
        """Keep the request's stage times (µs), with the rest of its time as `stages[0]`."""
        own = sum(self.current.values())
        self.current[stages[0]] += total_ns - own
        for stage in stages:
            self.kept[stage].append(self.current.get(stage, 0) / 1000)
        self.current = defaultdict(int)


def timed_sync(clocks: Clocks, stage: str, function: Callable[..., Any]) -> Callable[..., Any]:
    def timed(*args: Any, **kwargs: Any) -> Any:
        frame = clocks.enter()
        try:
            return function(*args, **kwargs)
        finally:
            clocks.leave(stage, frame)

    return timed


def timed_async(clocks: Clocks, stage: str, function: Callable[..., Any]) -> Callable[..., Any]:
    async def timed(*args: Any, **kwargs: Any) -> Any:
        frame = clocks.enter()
        try:
            return await function(*args, **kwargs)
        finally:
            clocks.leave(stage, frame)

    return timed


@contextmanager
def patched(targets: list[tuple[Any, str, str, bool]], clocks: Clocks) -> Iterator[None]:
    """Each (owner, attribute, stage, is_async) wrapped with a clock while inside."""
    saved = [(owner, name, getattr(owner, name)) for owner, name, _, _ in targets]
    for owner, name, stage, is_async in targets:
        wrap = timed_async if is_async else timed_sync
        setattr(owner, name, wrap(clocks, stage, getattr(owner, name)))
    try:
        yield
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)


# --- what is timed --------------------------------------------------------------------------

HTTP = "HTTP: uvicorn + httptools (+ protocol.py)"
ASGI = "ASGI stack: Starlette/FastAPI middleware, routing"
ROUTE = "route handler (FastAPI's, or `DirectRoute`), Response, the endpoint's own lines"
Target = tuple[Any, str, str, bool]
UVICORN_PROTOCOL = "marginwatch, uvicorn's protocol"


def common_targets() -> list[Target]:
    return [
        (Request, "body", "body reading", True),
        (orjson, "loads", "JSON parsing (orjson)", False),
        (ort.InferenceSession, "run", "ORT run", False),
        (orjson, "dumps", "response encoding", False),
    ]


def service_targets(connection: Connection, app: Any) -> list[Target]:
    (guard,) = [r.app for r in app.router.routes if getattr(r, "name", "") == "v2_infer"]
    layer = app.middleware_stack  # built by the warm-up requests
    while not isinstance(layer, RequestMetricsMiddleware):
        layer = layer.app
    return [
        (connection.protocol.app, "app", ASGI, True),
        (layer, "app", ASGI, True),  # the stack inside the middleware: errors, routing
        (RequestMetricsMiddleware, "__call__", "middleware.py (request metrics middleware)", True),
        (RequestMetricsMiddleware, "_record", "metrics recording", False),
        (ServiceMetrics, "observe_batch", "metrics recording", False),
        (AdmissionGuard, "__call__", "admission (ticket, place)", True),
        (guard, "app", ROUTE, True),
        (RequestReader, "read", "request reader (model, content type, limits)", True),
        (RequestReader, "_decode", "request reader (model, content type, limits)", False),
        (RequestReader, "_body", "body reading", True),
        (routes_v2, "validate_schema", "schema check (pydantic)", False),
        (routes_v2, "input_array", "input tensor (as_float32, numbers only)", False),
        (RequestReader, "check", "batch checks (shape, NaN, range)", False),
        (MicroBatcher, "submit", "batcher", True),
        (ServedModel, "predict", "flags and answers (engine.py, answers.py)", False),
        (routes_v2, "budget_index", "budget (eps)", False),
        (routes_v2, "at_budget", "budget (eps)", False),
        (routes_v2, "encode_response", "response encoding", False),
        (routes_v2, "calibration_facts", "response encoding", False),
        (routes_v2, "budget_facts", "response encoding", False),
        *common_targets(),
    ]


def minimal_targets(connection: Connection, app: Any, path: str) -> list[Target]:
    (route,) = [r for r in app.router.routes if getattr(r, "path", "") == path]
    return [(connection.protocol.app, "app", ASGI, True), (route, "app", ROUTE, True),
            *common_targets()]  # fmt: skip


STAGES = [
    HTTP,
    ASGI,
    "middleware.py (request metrics middleware)",
    "admission (ticket, place)",
    ROUTE,
    "request reader (model, content type, limits)",
    "body reading",
    "JSON parsing (orjson)",
    "schema check (pydantic)",
    "input tensor (as_float32, numbers only)",
    "batch checks (shape, NaN, range)",
    "batcher",
    "ORT run",
    "flags and answers (engine.py, answers.py)",
    "budget (eps)",
    "metrics recording",
    "response encoding",
]


async def plain(connection: Connection, requests: int) -> float:
    """The thread's CPU time per request (µs), no clocks: on a shared machine the scheduler takes
    the process off its core now and then, which wall time would count."""
    started = time.thread_time_ns()
    for _ in range(requests):
        await connection.one()
    return (time.thread_time_ns() - started) / requests / 1000


async def staged(
    connection: Connection, targets: list[Target], clocks: Clocks, requests: int
) -> float:
    """The stages' times into `clocks`; the thread's CPU time per request (µs), clocks included."""
    started_cpu = time.thread_time_ns()
    with patched(targets, clocks):
        for _ in range(requests):
            started = time.perf_counter_ns()
            await connection.one()
            clocks.end_request(time.perf_counter_ns() - started, STAGES)
    return (time.thread_time_ns() - started_cpu) / requests / 1000


def connections(service: Any, minimal: Any, request: bytes) -> dict[str, Connection]:
    return {
        "minimal": connect("minimal", minimal, HttpToolsProtocol, request, server_header=True),
        "marginwatch": connect(
            "marginwatch", service, timed_protocol(5.0), request, server_header=False
        ),
        # the service behind uvicorn's own protocol: what protocol.py adds
        UVICORN_PROTOCOL: connect(
            UVICORN_PROTOCOL, service, HttpToolsProtocol, request, server_header=False
        ),
    }


async def measure(args: argparse.Namespace) -> None:
    store = args.store or default_store()
    path, minimal_path = paths("v2", MODEL)
    assert path == minimal_path  # one request serves both
    request = encode_request(path, request_body("v2"))
    service = create_app(
        Settings(store=store, models=[MODEL], intra_op_threads=1, reload_interval_s=0)
    )
    lifespan = await start_lifespan(service)
    minimal = build_app(str(current_dir(store, MODEL) / ONNX_FILE), 1, MODEL)
    linked = connections(service, minimal, request)
    for connection in linked.values():
        await plain(connection, 300)
    targets = {
        "minimal": minimal_targets(linked["minimal"], minimal, minimal_path),
        "marginwatch": service_targets(linked["marginwatch"], service),
    }
    tune_garbage_collector()  # as marginwatch-serve does; applied to both apps alike
    times: dict[str, list[float]] = defaultdict(list)  # per round
    clocks = {name: Clocks() for name in targets}
    for round_ in range(args.rounds):
        order = list(linked) if round_ % 2 == 0 else list(reversed(linked))
        for name in order:
            times[name].append(await plain(linked[name], args.requests))
            if name in targets:
                cpu = await staged(linked[name], targets[name], clocks[name], args.requests)
                times[f"{name} with clocks"].append(cpu)
    lifespan.cancel()
    report(times, clocks, args)


def report(
    times: dict[str, list[float]], clocks: dict[str, Clocks], args: argparse.Namespace
) -> None:
    print(f"{MODEL}, one image per request (OIP v2 JSON), concurrency 1, {args.rounds} rounds of "
          f"{args.requests} requests per app; medians, µs per request\n")  # fmt: skip
    print("| cost | minimal | marginwatch | difference |")
    print("|---|---:|---:|---:|")
    for stage in STAGES:
        values = [
            statistics.median(clocks[name].kept[stage]) for name in ("minimal", "marginwatch")
        ]
        print(f"| {stage} | {values[0]:.1f} | {values[1]:.1f} | {values[1] - values[0]:+.1f} |")
    plain_total = {name: statistics.median(values) for name, values in times.items()}
    names = ("minimal", "marginwatch")
    summed = [
        sum(statistics.median(clocks[name].kept[stage]) for stage in STAGES) for name in names
    ]
    print(f"| sum of the stages (wall, clocks included) | {summed[0]:.1f} | {summed[1]:.1f} | |")
    cost = [plain_total[f"{name} with clocks"] - plain_total[name] for name in names]
    print(f"| (the clocks' own CPU time) | {cost[0]:.1f} | {cost[1]:.1f} | |")
    totals = [plain_total[name] for name in names]
    print(f"| **total CPU time, no clocks** | **{totals[0]:.1f}** | **{totals[1]:.1f}** | "
          f"**{totals[1] - totals[0]:+.1f}** |")  # fmt: skip
    bare = plain_total[UVICORN_PROTOCOL]
    print(f"\nrate: marginwatch {totals[0] / totals[1]:.3f}× the minimal endpoint's (CPU time); "
          f"behind uvicorn's own protocol {bare:.1f} µs (protocol.py: {totals[1] - bare:+.1f} "
          "µs)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=1000, help="requests per app per round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--store", type=Path, default=None, help="artifact store (default: ours)")
    args = parser.parse_args()
    import uvloop  # a dependency of uvicorn[standard], which the project depends on

    uvloop.run(measure(args))


if __name__ == "__main__":
    main()
