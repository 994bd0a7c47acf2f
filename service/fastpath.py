"""The per-request speed devices: each one here, with what it saves (docs/benchmarks.md; measured
in process with `bench/asgi_overhead.py`, or under load with `bench/serve_load.py`).

1. **Routes in the app's own table, the two inference routes first** (`splice_routes`; each
   router lists its inference route first). FastAPI 0.165 keeps included routers nested, and
   matching a request through them cost about 13 µs. Each router already carries its tags,
   dependencies and error responses on its routes.
2. **`{name}` read from the path parameters by hand** (`model_name`), not declared as an
   endpoint argument: FastAPI's parameter validation cost about 9 µs a request (6 % of the
   service's own time per one-image request), for a string the registry checks anyway. OpenAPI
   would lose the parameter, so `inference_route_docs` documents it by hand.
3. **Bodies read and parsed by the routes themselves** (`payload.RequestReader`: orjson, then
   the pydantic model), not declared as a FastAPI body parameter: the size limit applies while
   streaming, the binary tensor extension is not JSON, and numbers become one numpy array in one
   call. `request_body` documents the schema FastAPI no longer sees.
4. **No parsed body held across the await**: the reader returns only the float32 batch, so the
   body and its parsed lists die before the request waits for its batch. 64 requests in flight
   kept 64 parsed 784-float lists alive, out of the caches; concurrency 32 went from 4,934 to
   6,177 req/s.
5. **No authentication dependency at all without API keys** (`auth_dependencies`): FastAPI
   solves a route's dependencies on every request, even one that returns at once. Measured in
   one process against the same app with such a dependency (one-image requests, the model's
   execution taken out, 2-core machine): 37 µs of the service's own 353 µs, about 11 %.
6. **The cyclic garbage collector off the request path** (`tune_garbage_collector`, called by
   `marginwatch-serve` once the app is built). Requests in flight together keep thousands of
   small objects alive, which with the default gen-0 threshold (700) starts a collection every
   few requests, and the full ones walk every object the imports created: at concurrency 64 the
   collector took 0.66 s of every 3 s (22 % of the server's time); after, 0.03 s. Nearly all a
   request allocates is freed by reference counting, so collections can be rare. Rare, but
   bounded: what reference counting cannot free (cycles around an exception's traceback, which
   hold a request's frames and so its body) waits for a collection, and with the raised
   threshold alone one might never come (a few large objects count as few allocations: 31
   failed 90 MB gRPC calls took the process to 3.8 GB). So the lifespan also runs a full
   collection every `GC_INTERVAL_S` (`collect_garbage`): a young heap after the freeze, about a
   millisecond idle and a few under load, well under 1 % of a second.
7. **A short GIL switch interval** (`tune_thread_switching`, called with the previous one):
   0.5 ms instead of Python's 5 ms. When a batch runs in the model's thread (under load, see
   `batcher.py`), ONNX Runtime releases the GIL, and taking it back to hand the result over
   waited for the busy event loop's thread to be forced off it, up to 5 ms per batch, during
   which the next batch could not start. Concurrency 1,000 on 2 cores (`bench/overload.py`):
   about 1,400 → 1,500 answers/s, p99 1.03 → 0.93–0.98 s.

Devices that are part of another component's design, and documented there (the last item's
devices are not measured separately):
- the batcher's dispatch by `loop.call_soon` instead of a worker task woken by an event (p99 at
  concurrency 64 from 70 ms to 15 ms), small batches run on the loop's thread, and a lone
  request run at once after eight batches of one (`batcher.py`);
- per-request and per-batch metrics as one deque append, folded in numpy at scrape time: 22 µs
  → 4 µs per batch (`metrics.ServedTraffic`);
- the request middleware is pure ASGI (`middleware.py`); the inference routes return a finished
  `Response`, so FastAPI neither validates nor re-serialises it (`response_model` only
  documents); `Prediction` is a plain, not frozen, dataclass and `Deployment.infer` hands back
  the batcher's own coroutine (`engine.py`, `registry.py`): no extra work per request.
"""

from __future__ import annotations

import asyncio
import gc
import sys
from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, params
from pydantic import BaseModel, SecretStr
from starlette.requests import Request

from marginwatch.service.auth import api_key_check


def splice_routes(app: FastAPI, routers: Sequence[APIRouter]) -> None:
    """Put the routers' routes at the front of the app's own route list, in order (device 1)."""
    app.router.routes[:0] = [route for router in routers for route in router.routes]


def model_name(request: Request) -> str:
    """The `{name}` of an inference route's path, unvalidated: the registry checks it (device 2)."""
    name: str = request.path_params["name"]
    return name


def auth_dependencies(keys: Sequence[SecretStr]) -> list[params.Depends]:
    """The API key check as a route dependency, or no dependency at all without keys (device 5)."""
    return [Depends(api_key_check(keys))] if keys else []


SWITCH_INTERVAL_S = 0.0005


def tune_thread_switching() -> None:
    """Hand the GIL over every 0.5 ms rather than every 5 ms (device 7): call once, at start."""
    sys.setswitchinterval(SWITCH_INTERVAL_S)


def tune_garbage_collector() -> None:
    """Move every object made so far out of the collector's sight and make collections rare
    (device 6): call once, after start-up has built the app."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)


GC_INTERVAL_S = 1.0


async def collect_garbage(interval_s: float = GC_INTERVAL_S) -> None:
    """A full collection every `interval_s`, until cancelled (device 6's bound): garbage in
    reference cycles lives at most this long, whatever the thresholds."""
    while True:
        await asyncio.sleep(interval_s)
        gc.collect()


def request_body(model: type[BaseModel], media_types: Sequence[str]) -> dict[str, Any]:
    """`openapi_extra` documenting a body that the route reads itself (device 3)."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            reference = node.get("$ref")
            if isinstance(reference, str) and reference.startswith("#/$defs/"):
                return inline(definitions[reference.removeprefix("#/$defs/")])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(value) for value in node]
        return node

    content = {media: {"schema": inline(schema)} for media in media_types}
    return {"requestBody": {"required": True, "content": content}}


def inference_route_docs(model: type[BaseModel], media_types: Sequence[str]) -> dict[str, Any]:
    """`openapi_extra` of an inference route: its body and its `{name}` (devices 2 and 3)."""
    name = {
        "name": "name",
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
        "description": "the served model",
    }
    return {**request_body(model, media_types), "parameters": [name]}
