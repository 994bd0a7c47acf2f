"""The interpreter's runtime tuned for serving: the cyclic garbage collector and the GIL's switch
interval, set by `marginwatch-serve` (`__main__.py`) once the app is built, and the periodic
collection the app's lifespan (`app.py`) runs. Two per-request speed devices, each with what it
saves (docs/benchmarks.md; measured under load with `bench/serve_load.py` and `bench/overload.py`):

- **The cyclic garbage collector off the request path** (`tune_garbage_collector`). Requests in
  flight together keep thousands of small objects alive, which with the default gen-0 threshold
  (700) starts a collection every few requests, and the full ones walk every object the imports
  created: at concurrency 64 the collector took 0.66 s of every 3 s (22 % of the server's time);
  after, 0.03 s. Nearly all a request allocates is freed by reference counting, so collections
  can be rare. Rare, but bounded: what reference counting cannot free (cycles around an
  exception's traceback, which hold a request's frames and so its body) waits for a collection,
  and with the raised threshold alone one might never come (a few large objects count as few
  allocations: 31 failed 90 MB gRPC calls took the process to 3.8 GB). So the lifespan also runs
  a full collection every `GC_INTERVAL_S` (`collect_garbage`): a young heap after the freeze,
  about a millisecond idle and a few under load, well under 1 % of a second.
- **A short GIL switch interval** (`tune_thread_switching`): 0.5 ms instead of Python's 5 ms.
  When a batch runs in the model's thread (under load, see `batcher.py`), ONNX Runtime releases
  the GIL, and taking it back to hand the result over waited for the busy event loop's thread to
  be forced off it, up to 5 ms per batch, during which the next batch could not start.
  Concurrency 1,000 on 2 cores (`bench/overload.py`): about 1,400 → 1,500 answers/s, p99
  1.03 → 0.93–0.98 s.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import gc
import sys
from collections.abc import Callable

SWITCH_INTERVAL_S = 0.0005


def tune_thread_switching() -> None:
    """Hand the GIL over every 0.5 ms rather than every 5 ms: call once, at start."""
    sys.setswitchinterval(SWITCH_INTERVAL_S)


def tune_garbage_collector() -> None:
    """Move every object made so far out of the collector's sight and make collections rare:
    call once, after start-up has built the app."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)


GC_INTERVAL_S = 1.0


def _malloc_trim() -> Callable[[], object]:
    """glibc's `malloc_trim(0)`, or a no-op where the C library has none (musl, macOS)."""
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return functools.partial(trim, 0)


async def collect_garbage(interval_s: float = GC_INTERVAL_S) -> None:
    """A full collection every `interval_s`, until cancelled (the tuned collector's bound):
    garbage in reference cycles lives at most this long, whatever the thresholds. Then the freed
    memory goes back to the system: glibc keeps freed blocks of a few MB (gRPC messages, large
    bodies) in its arenas once its dynamic mmap threshold has risen past them, and the
    process's RSS, which the container's memory limit counts, would stay at its peak (85
    failed 3 MiB gRPC calls once left 116 MiB more resident after 30 s)."""
    trim = _malloc_trim()
    while True:
        await asyncio.sleep(interval_s)
        gc.collect()
        trim()
