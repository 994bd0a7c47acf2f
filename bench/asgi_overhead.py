"""What the service costs per request beyond the minimal endpoint, without sockets.

Both ASGI apps (the service, with its lifespan started, and `bench/minimal_baseline.py`) are
called in one process with the same one-image body, one request at a time (or `--concurrency`
at once), in interleaved rounds; prints the median time per request of each and the difference,
as wall time and as the thread's CPU time (which the scheduler's time for other processes does
not inflate: on a shared machine the steadier of the two), with each round's rate ratio. This
isolates the apps' own Python from the HTTP server and the load generator, which are the same
for both; on a quiet machine it is steady to about a microsecond where a load test over
loopback moves by 10 % from run to run. `bench/request_profile.py` adds the HTTP protocol and
splits the time into stages.

    OMP_NUM_THREADS=1 .venv/bin/python bench/asgi_overhead.py [--requests 2000] [--rounds 7]
    OMP_NUM_THREADS=1 .venv/bin/python bench/asgi_overhead.py --api v2   # the OIP v2 JSON body

`--api v1` (the default) sends `{"inputs": [...]}` to the service's `/v1/models/<model>/predict`
and the minimal app's `/predict`; `--api v2` sends one Open Inference Protocol v2 JSON input
tensor to `/v2/models/<model>/infer` of both.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import orjson
from minimal_baseline import build_app  # a sibling: Python puts a script's folder on the path
from serve_load import median_ratio

from marginwatch.artifact.schema import ONNX_FILE
from marginwatch.artifact.store import current_dir, default_store
from marginwatch.models.data import load_dataset
from marginwatch.service.app import create_app
from marginwatch.service.settings import Settings

MODEL = "fmnist-cnn-pgd"
Message = MutableMapping[str, Any]
App = Callable[[Message, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
               Awaitable[None]]  # fmt: skip


def http_scope(path: str, body: bytes) -> Message:
    headers = [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]  # fmt: skip
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
            "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
            "headers": headers, "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
            "root_path": "", "state": {}}  # fmt: skip


async def one_request(app: App, path: str, body: bytes) -> None:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(http_scope(path, body), receive, send)
    if sent[0]["status"] != 200:
        raise RuntimeError(f"{path} answered {sent[0]['status']}: {sent[-1].get('body')!r}")


async def start_lifespan(app: App) -> asyncio.Task[None]:
    """Run the app's lifespan until startup completes; the task keeps it alive."""
    inbox: asyncio.Queue[Message] = asyncio.Queue()
    outbox: asyncio.Queue[Message] = asyncio.Queue()
    await inbox.put({"type": "lifespan.startup"})
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    task = asyncio.ensure_future(app(scope, inbox.get, outbox.put))
    message = await outbox.get()
    if message["type"] != "lifespan.startup.complete":
        raise RuntimeError(f"the service did not start: {message}")
    return task


def request_body(api: str, images: int = 1) -> bytes:
    """`images` Fashion-MNIST test images as the `api`'s JSON body: v1's `{"inputs": [...]}`, or
    one OIP v2 input tensor (flat `data`, as tritonclient sends it)."""
    x = load_dataset("fashion-mnist-subset", "test").float_images[:images]
    if api == "v1":
        return orjson.dumps({"inputs": x.tolist()})
    tensor = {"name": "input", "shape": list(x.shape), "datatype": "FP32",
              "data": x.ravel().tolist()}  # fmt: skip
    return orjson.dumps({"inputs": [tensor]})


def paths(api: str, model: str) -> tuple[str, str]:
    """The (service, minimal app) paths of the `api`'s inference route."""
    if api == "v1":
        return f"/v1/models/{model}/predict", "/predict"
    return f"/v2/models/{model}/infer", f"/v2/models/{model}/infer"


async def measure(args: argparse.Namespace) -> None:
    store = args.store or default_store()
    onnx = current_dir(store, MODEL) / ONNX_FILE
    body = request_body(args.api)
    service = create_app(
        Settings(store=store, models=[MODEL], intra_op_threads=1, reload_interval_s=0)
    )
    lifespan = await start_lifespan(service)
    service_path, minimal_path = paths(args.api, MODEL)
    apps: dict[str, tuple[App, str]] = {
        "minimal": (build_app(str(onnx), 1, MODEL), minimal_path),
        "marginwatch": (service, service_path),
    }
    gc.collect()
    gc.freeze()  # as marginwatch-serve does; applied to both apps alike
    # wall time, and the thread's CPU time: on a shared machine the scheduler takes the process
    # off its core now and then, which wall time counts and CPU time does not
    wall: dict[str, list[float]] = {name: [] for name in apps}
    cpu: dict[str, list[float]] = {name: [] for name in apps}
    batches = max(1, args.requests // args.concurrency)
    for round_ in range(args.rounds):
        for name in apps if round_ % 2 == 0 else reversed(apps):
            app, path = apps[name]
            started, started_cpu = time.perf_counter(), time.thread_time()
            for _ in range(batches):
                await asyncio.gather(
                    *(one_request(app, path, body) for _ in range(args.concurrency))
                )
            count = batches * args.concurrency
            wall[name].append((time.perf_counter() - started) / count * 1e6)
            cpu[name].append((time.thread_time() - started_cpu) / count * 1e6)
    print(f"{MODEL}, one image per request ({args.api} body), concurrency {args.concurrency}, "
          f"{args.rounds} rounds of {batches * args.concurrency} requests; medians")  # fmt: skip
    for label, times in (("wall", wall), ("CPU", cpu)):
        medians = {name: statistics.median(values) for name, values in times.items()}
        for name, value in medians.items():
            print(f"  {name:12s} {value:7.1f} µs per request ({label})")
        extra = medians["marginwatch"] - medians["minimal"]
        rate = medians["minimal"] / medians["marginwatch"]
        print(f"  marginwatch costs {extra:+.1f} µs per request ({rate:.3f}× the minimal app's "
              f"rate, {label}; rounds {median_ratio(ratios(times))})")  # fmt: skip
    lifespan.cancel()


def ratios(times: dict[str, list[float]]) -> list[float]:
    """Each round's rate of the service against the minimal app's (the inverse of the times)."""
    pairs = zip(times["minimal"], times["marginwatch"], strict=True)
    return [minimal / service for minimal, service in pairs]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000, help="requests per app per round")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (median taken)")
    parser.add_argument("--concurrency", type=int, default=1, help="requests awaited together")
    parser.add_argument("--store", type=Path, default=None, help="artifact store (default: ours)")
    parser.add_argument("--api", choices=("v1", "v2"), default="v1", help="which body and route")
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:  # plain asyncio: both apps still compare like for like
        asyncio.run(measure(args))
    else:
        uvloop.run(measure(args))


if __name__ == "__main__":
    main()
