"""Hostile inputs (issue 19): each probe against the real server, with ordinary traffic beside it
(docs/benchmarks.md, "Hostile inputs").

    python bench/hostile.py                  # every probe, about 2 minutes
    python bench/hostile.py --only png jpeg  # some of them

One server, `python -m marginwatch.service` with its default settings plus an API key, gRPC and
a separate metrics port (the probes need them), the model in the store (`artifacts/`, else a
seeded one). For each probe: the server's resident memory before, its peak while the probe runs
(VmRSS sampled every 10 ms) and after (2 s later, after the periodic collection); the hostile
requests' answers and time; and what four clients sending one-image requests back to back (with
the key) got meanwhile: status counts, p50 and p99. Targets: peak ≤ 512 MiB, back near the
baseline, ordinary requests answered within their 1 s deadline, no 5xx.

Probes (the issue's figures before the fix in brackets):
- **grpc**: 31 keyless ModelInfer calls of 90 MB [3.8 GB], then 400 keyed ones of 263 KB for a
  model that does not exist [+284 MB];
- **png**: a form of 11 PNGs, each with 63 zTXt chunks of 1 MB decompressed [818 MB peak];
- **slow**: 77 connections declaring 1.3 MB and sending a byte every 3.5 s, for 15 s [every
  ordinary request 503];
- **jpeg**: a 504 KB progressive 2048×2048 JPEG of 31,000 scans [10 s of CPU; a 28×28 request
  waited 15 s, then 503], sent 4 times;
- **metrics**: 2,000 connections to the metrics port sending half a request line [4,006
  threads]; the server's thread count is printed;
- **sigterm**: (a server of its own) 16 keep-alive clients sending back to back while SIGTERM
  arrives; counts answers, clean closes and resets [resets].
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import signal
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import orjson
from PIL import Image
from serve_load import choose_model, free_port, running  # a sibling: on the script's path
from tritonclient.grpc import service_pb2, service_pb2_grpc

KEY = "bench-hostile-key-0123"
MIB = 1024 * 1024
PROBES = ("grpc", "png", "slow", "jpeg", "metrics", "sigterm")


# --- hostile payloads ---------------------------------------------------------------------------


def png_bomb(chunks: int = 63, text_bytes: int = MIB) -> bytes:
    """A 28×28 PNG with `chunks` zTXt chunks (distinct keys), each `text_bytes` decompressed."""
    out = io.BytesIO()
    Image.fromarray(np.full((28, 28), 128, np.uint8)).save(out, "PNG")
    data = out.getvalue()
    compressed = zlib.compress(b"a" * text_bytes, 9)
    extra = b""
    for index in range(chunks):
        body = f"note{index}".encode() + b"\0\0" + compressed
        extra += struct.pack(">I", len(body)) + b"zTXt" + body
        extra += struct.pack(">I", zlib.crc32(b"zTXt" + body))
    cut = data.index(b"IDAT") - 4
    return data[:cut] + extra + data[cut:]


def _segment(marker: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload


def _stuffed(bits: str) -> bytes:
    """Entropy-coded bytes of `bits`, padded with ones, each 0xFF followed by 0x00."""
    bits += "1" * (-len(bits) % 8)
    out = bytearray()
    for at in range(0, len(bits), 8):
        out.append(int(bits[at : at + 8], 2))
        if out[-1] == 0xFF:
            out.append(0)
    return bytes(out)


def jpeg_scan_bomb(scans: int = 31_000, side: int = 2048) -> bytes:
    """A progressive gray `side`² JPEG: one DC scan, then `scans` identical AC scans that each
    skip every block with two EOB runs of 32,767 and one of 2 (15 bytes a scan); libjpeg walks
    the whole image for each."""
    blocks = (side // 8) ** 2
    head = b"\xff\xd8" + _segment(0xDB, b"\x00" + b"\x01" * 64)
    head += _segment(0xC2, struct.pack(">BHHB", 8, side, side, 1) + b"\x01\x11\x00")
    head += _segment(0xC4, b"\x00" + bytes([1] + [0] * 15) + b"\x00")  # DC: '0' = diff 0
    head += _segment(0xC4, b"\x10" + bytes([1, 1] + [0] * 14) + b"\xe0\x10")  # AC: EOB runs
    dc = _segment(0xDA, b"\x01\x01\x00\x00\x00\x00") + _stuffed("0" * blocks)
    runs, left = "", blocks
    while left >= 32_767:
        runs, left = runs + "0" + "1" * 14, left - 32_767  # EOBRUN 2^14 + 16,383
    runs += "10" + format(left - 2, "01b") if left else ""  # EOBRUN 2 + (left - 2)
    ac = _segment(0xDA, b"\x01\x01\x00\x01\x3f\x00") + _stuffed(runs)
    return head + dc + ac * scans + b"\xff\xd9"


def form_body(files: list[tuple[str, bytes, str]]) -> tuple[bytes, str]:
    boundary = "hostile-bench-boundary"
    parts = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        f"Content-Type: {kind}\r\n\r\n".encode()
        + data
        + b"\r\n"
        for name, data, kind in files
    )
    return parts + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def http_request(path: str, body: bytes, content_type: str = "application/json") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {KEY}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def exchange(port: int, request: bytes, timeout_s: float = 60) -> tuple[int, float]:
    """One request on a new connection: its status (0: no answer) and seconds."""
    started = time.perf_counter()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout_s)
        writer.close()
        return int(head[9:12]), time.perf_counter() - started
    except (OSError, asyncio.IncompleteReadError, TimeoutError):
        return 0, time.perf_counter() - started


# --- what ordinary clients get, and the server's memory ---------------------------------------


class Ordinary:
    """Four clients sending one-image requests back to back, each on its own connection."""

    def __init__(self, port: int, model: str) -> None:
        image = np.full((1, 1, 28, 28), 0.5, np.float32).tolist()
        self._request = http_request(
            f"/v1/models/{model}/predict", orjson.dumps({"inputs": image})
        ) .replace(b"Host:", b"Connection: close\r\nHost:")  # fmt: skip
        self._port = port
        self.results: list[tuple[int, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _client(self) -> None:
        while not self._stop.is_set():
            self.results.append(await exchange(self._port, self._request, 10))

    async def _run(self) -> None:
        await asyncio.gather(*(self._client() for _ in range(4)))

    def __enter__(self) -> Ordinary:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> str:
        statuses = Counter(status for status, _ in self.results)
        seconds = sorted(s for _, s in self.results)
        if not seconds:
            return "none"
        p99 = seconds[min(len(seconds) - 1, int(0.99 * len(seconds)))]
        shown = ", ".join(f"{s or 'no answer'}: {n}" for s, n in sorted(statuses.items()))
        return f"{shown}; p50 {statistics.median(seconds) * 1e3:.0f} ms, p99 {p99 * 1e3:.0f} ms"


@contextlib.contextmanager
def peak_rss(pid: int) -> Iterator[list[float]]:
    """The highest VmRSS (MiB) while the block runs, sampled every 10 ms: [peak]."""
    peak = [resident_mb(pid)]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.01):
            with contextlib.suppress(OSError):
                peak[0] = max(peak[0], resident_mb(pid))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join()


def proc_field(pid: int, field: str) -> int:
    """A number of the process's /proc status (kB for memory); -1 if absent."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return -1


def resident_mb(pid: int) -> float:
    return proc_field(pid, "VmRSS") / 1024


# --- the probes: each returns a line on the hostile requests' answers --------------------------


def grpc_probe(grpc_port: int, model: str) -> str:
    options = [("grpc.max_send_message_length", 128 * MIB)]
    codes: Counter[str] = Counter()
    started = time.perf_counter()
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}", options=options) as channel:
        infer = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        big = service_pb2.ModelInferRequest(model_name=model)
        big.inputs.add(name="input", datatype="FP32", shape=[1, 1, 28, 28])
        big.raw_input_contents.append(b"\0" * (90 * 1000 * 1000))
        small = service_pb2.ModelInferRequest(model_name="nope")
        small.inputs.add(name="input", datatype="FP32", shape=[1, 1, 28, 28])
        small.raw_input_contents.append(b"\0" * 263_000)
        calls = [(big, ())] * 31 + [(small, (("x-api-key", KEY),))] * 400
        for request, metadata in calls:
            try:
                infer(request, metadata=metadata, timeout=60)
                codes["OK"] += 1
            except grpc.RpcError as error:
                codes[error.code().name] += 1
    return f"{dict(codes)} in {time.perf_counter() - started:.1f} s"


def png_probe(port: int, model: str) -> str:
    body, kind = form_body([(f"{i}.png", png_bomb(), "image/png") for i in range(11)])
    status, seconds = asyncio.run(exchange(port, http_request(f"/v1/models/{model}/predict",
                                                              body, kind)))  # fmt: skip
    return f"{len(body) / 1e3:.0f} kB form: {status} in {seconds * 1e3:.0f} ms"


def slow_probe(port: int, model: str, duration_s: float = 15.0) -> str:
    head = http_request(f"/v1/models/{model}/predict", b"{")
    head = head.replace(b"Content-Length: 1", b"Content-Length: 1300000")
    sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(77)]
    for connection in sockets:
        connection.sendall(head)
    started = time.monotonic()
    while time.monotonic() - started < duration_s:
        time.sleep(3.5)
        for connection in sockets:
            with contextlib.suppress(OSError):
                connection.sendall(b" ")
    answers: Counter[str] = Counter()
    for connection in sockets:
        connection.settimeout(5)
        try:
            answers[connection.recv(12).decode(errors="replace")[9:12] or "closed"] += 1
        except OSError:
            answers["no answer"] += 1
        connection.close()
    return f"77 trickling bodies for {duration_s:.0f} s, then: {dict(answers)}"


def jpeg_probe(port: int, model: str) -> str:
    bomb = jpeg_scan_bomb()
    body, kind = form_body([("bomb.jpg", bomb, "image/jpeg")])
    request = http_request(f"/v1/models/{model}/predict?resize=true", body, kind)
    answers = [asyncio.run(exchange(port, request)) for _ in range(4)]
    shown = ", ".join(f"{status} in {seconds * 1e3:.0f} ms" for status, seconds in answers)
    scans = bomb.count(b"\xff\xda")
    return f"{len(bomb) / 1e3:.0f} kB, {scans} scans, × 4: {shown}"


def metrics_probe(metrics_port: int, pid: int, count: int = 2000) -> str:
    before = proc_field(pid, "Threads")
    sockets, most = [], before
    for _ in range(count):
        connection = socket.socket()
        with contextlib.suppress(OSError):
            connection.connect(("127.0.0.1", metrics_port))
            connection.sendall(b"GET /metr")
        sockets.append(connection)
        most = max(most, proc_field(pid, "Threads"))
    time.sleep(1)
    most = max(most, proc_field(pid, "Threads"))
    for connection in sockets:
        connection.close()
    started = time.perf_counter()
    status, _ = asyncio.run(exchange(metrics_port, b"GET /metrics HTTP/1.0\r\n\r\n", 10))
    scrape_ms = (time.perf_counter() - started) * 1e3
    return (f"{count} slow-header connections: threads {before} -> at most {most}; a scrape "
            f"after: {status} in {scrape_ms:.0f} ms")  # fmt: skip


async def _keep_alive_client(port: int, request: bytes, outcomes: Counter[str]) -> None:
    """Requests back to back on one connection until it closes: counts answers and how the
    connection ended (a clean close after `Connection: close`, or a reset)."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        outcomes["refused at connect"] += 1
        return
    try:
        while True:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            outcomes[f"{int(head[9:12])}"] += 1
            if b"connection: close" in head.lower():
                outcomes["closed cleanly"] += 1
                return
    except (ConnectionResetError, BrokenPipeError):
        outcomes["reset"] += 1
    except asyncio.IncompleteReadError:
        outcomes["closed without an answer"] += 1


def server_command(store: Path, model: str, port: int) -> list[str]:
    return [sys.executable, "-m", "marginwatch.service", "--store", str(store),
            "--models", model, "--port", str(port), "--log-level", "warning"]  # fmt: skip


def sigterm_probe(store: Path, model: str) -> str:
    port = free_port()
    command = server_command(store, model, port)
    image = np.full((1, 1, 28, 28), 0.5, np.float32).tolist()
    request = http_request(f"/v1/models/{model}/predict", orjson.dumps({"inputs": image}))
    outcomes: Counter[str] = Counter()
    with running(command, {"MARGINWATCH_API_KEYS": KEY}) as process:
        wait_live(port, process)

        async def scenario() -> None:
            clients = [asyncio.ensure_future(_keep_alive_client(port, request, outcomes))
                       for _ in range(16)]  # fmt: skip
            await asyncio.sleep(1.0)
            os.killpg(process.pid, signal.SIGTERM)
            await asyncio.gather(*clients)

        asyncio.run(scenario())
        process.wait(60)
    return f"16 keep-alive clients across SIGTERM: {dict(outcomes)}"


def wait_live(port: int, process: object) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        ask = b"GET /v2/health/ready HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        if asyncio.run(exchange(port, ask, 2))[0] == 200:
            return
        time.sleep(0.2)
    raise RuntimeError(f"server not ready in 90 s ({process})")


def run_probe(name: str, probe: Callable[[], str], pid: int, port: int, model: str) -> None:
    before = resident_mb(pid)
    with Ordinary(port, model) as ordinary, peak_rss(pid) as peak:
        started = time.perf_counter()
        answer = probe()
        seconds = time.perf_counter() - started
    time.sleep(2)  # the periodic collection (every second) has run
    print(f"\n## {name} ({seconds:.1f} s)\n  hostile: {answer}\n"
          f"  RSS: before {before:.0f} MiB, peak {peak[0]:.0f} MiB, after {resident_mb(pid):.0f} "
          f"MiB\n  ordinary meanwhile: {ordinary.summary()}", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=PROBES, default=list(PROBES))
    parser.add_argument("--store", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        store, model = choose_model(args.store, Path(scratch))
        port, grpc_port, metrics_port = free_port(), free_port(), free_port()
        command = server_command(store, model, port)
        env = {"MARGINWATCH_API_KEYS": KEY, "MARGINWATCH_GRPC_PORT": str(grpc_port),
               "MARGINWATCH_METRICS_PORT": str(metrics_port)}  # fmt: skip
        probes: dict[str, Callable[[int], str]] = {
            "grpc": lambda _: grpc_probe(grpc_port, model),
            "png": lambda _: png_probe(port, model),
            "slow": lambda _: slow_probe(port, model),
            "jpeg": lambda _: jpeg_probe(port, model),
            "metrics": lambda pid: metrics_probe(metrics_port, pid),
        }
        print(f"model {model}; load average {os.getloadavg()[0]:.2f}", flush=True)
        with running(command, env) as process:
            wait_live(port, process)
            print(f"server pid {process.pid}: RSS {resident_mb(process.pid):.0f} MiB once ready")
            for name in args.only:
                if name in probes:
                    pid = process.pid
                    run_probe(name, lambda n=name, p=pid: probes[n](p), pid, port, model)
            peak = proc_field(process.pid, "VmHWM") / 1024
            print(f"\nserver peak over all probes (VmHWM): {peak:.0f} MiB")
        if "sigterm" in args.only:
            print(f"\n## sigterm\n  {sigterm_probe(store, model)}")


if __name__ == "__main__":
    main()
