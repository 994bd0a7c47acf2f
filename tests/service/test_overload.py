"""Overload is shed and memory bounded: admission (places, body bytes, the waiting room), request
deadlines in the batcher, read time-outs for slow clients, body limits derived from the model.

Statuses and outcomes only: timings belong to `bench/overload.py`. Where a test waits for the
server to act (close a stalled connection), its bound is only a way out should it never act.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import orjson
import pytest

from marginwatch.service.admission import Admission
from marginwatch.service.batcher import MicroBatcher, RunBatch
from marginwatch.service.engine import Prediction
from marginwatch.service.errors import SHED_REASONS, Overloaded, PayloadTooLarge
from marginwatch.service.payload import body_limit
from metrics_text import scrape, total

if TYPE_CHECKING:
    from conftest import Server, ServerFactory

MODEL = "fmnist"
V1 = f"/v1/models/{MODEL}/predict"
V2 = f"/v2/models/{MODEL}/infer"
SHAPE = (1, 28, 28)
MAX_INPUTS = 64  # the default max_inputs_per_request
JSON_LIMIT = MAX_INPUTS * 784 * 25 + 65536  # the model's JSON body limit (`payload.body_limit`)
BUDGET = JSON_LIMIT + 80_000  # the tight server's body budget: the largest request, and a bit
WAY_OUT_S = 60.0  # how long a socket read may block before the test fails


# --- raw HTTP ----------------------------------------------------------------------------------


def request_head(path: str, length: int, **headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: test", "Content-Type: application/json",
             f"Content-Length: {length}", *(f"{k}: {v}" for k, v in headers.items())]  # fmt: skip
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def connect(server: Server) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    connection = socket.create_connection((host, int(port)))
    connection.settimeout(WAY_OUT_S)
    return connection


def read_response(connection: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and body of one response with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response: {data!r}")
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in header_lines)
    headers = {name.lower(): value for name, value in headers.items()}
    while len(body) < int(headers["content-length"]):
        body += connection.recv(65536)
    return int(status_line.split()[1]), headers, body


def post(server: Server, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
    with connect(server) as connection:
        connection.sendall(request_head(path, len(body)) + body)
        return read_response(connection)


def closed_by_server(connection: socket.socket) -> bool:
    """Whether the server closes the connection without answering (reads until it does)."""
    try:
        return connection.recv(65536) == b""
    except ConnectionResetError:
        return True


def one_image() -> bytes:
    return orjson.dumps({"inputs": np.full((1, *SHAPE), 0.5, dtype=np.float32).tolist()})


def eventually(condition: Callable[[], bool]) -> bool:
    """Whether `condition` comes true, checking until `WAY_OUT_S` have passed."""
    give_up = time.monotonic() + WAY_OUT_S
    while not condition():
        if time.monotonic() > give_up:
            return False
        time.sleep(0.01)
    return True


def trickle(connection: socket.socket, stop: threading.Event) -> threading.Thread:
    """A thread that sends one byte of JSON whitespace every 0.1 s until `stop`: a slow upload
    that keeps making progress."""

    def run() -> None:
        while not stop.wait(0.1):
            connection.sendall(b" ")

    thread = threading.Thread(target=run)
    thread.start()
    return thread


# --- admission, in process ---------------------------------------------------------------------


def test_places_go_to_waiters_in_order_and_a_full_room_refuses_at_once() -> None:
    async def scenario() -> None:
        admission = Admission(max_requests=1, max_body_bytes=1 << 20, max_waiting=2, timeout_s=60)
        first, second, third, fourth = (admission.open() for _ in range(4))
        await first.take_place()
        waiting = [asyncio.ensure_future(ticket.take_place()) for ticket in (second, third)]
        await asyncio.sleep(0)
        assert admission.waiting == 2
        with pytest.raises(Overloaded, match="2 waiting"):
            await fourth.take_place()
        first.close()
        await waiting[0]
        assert not waiting[1].done() and admission.requests == 1
        second.close()
        await waiting[1]
        third.close()
        assert admission.requests == 0 and admission.waiting == 0

    asyncio.run(scenario())


def test_a_waiter_gives_up_before_its_deadline_and_a_cancelled_one_holds_nothing() -> None:
    async def scenario() -> None:
        admission = Admission(max_requests=1, max_body_bytes=1 << 20, max_waiting=8, timeout_s=0.05)
        holder = admission.open()
        await holder.take_place()
        with pytest.raises(Overloaded, match=r"in time for its 0\.05 s deadline"):
            await admission.open().take_place()
        cancelled = asyncio.ensure_future(admission.open().take_place())
        await asyncio.sleep(0)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        holder.close()
        assert admission.requests == 0 and admission.waiting == 0
        await admission.open().take_place()  # the freed place was not handed to a dead waiter

    asyncio.run(scenario())


def test_body_bytes_are_reserved_until_closed() -> None:
    admission = Admission(max_requests=4, max_body_bytes=10_000, max_waiting=0, timeout_s=1)
    first = admission.open()
    first.reserve_bytes(7_000)
    with pytest.raises(Overloaded, match="7000 bytes of request bodies"):
        admission.open().reserve_bytes(7_000)
    with pytest.raises(PayloadTooLarge, match="at most 10000 bytes"):
        admission.open().reserve_bytes(10_001)
    first.close()
    first.close()  # idempotent: nothing given back twice
    assert admission.body_bytes == 0
    admission.open().reserve_bytes(10_000)


# --- deadlines in the batcher ------------------------------------------------------------------


def test_a_request_past_its_deadline_is_refused_and_never_run(toy_model: RunBatch) -> None:
    """The first request's batch holds the model's thread; the second's deadline passes while it
    waits: it is answered `Overloaded` at once and its rows never reach the model. So is a request
    whose caller gave up (cancelled)."""
    release = threading.Event()
    batches: list[list[float]] = []

    def slow(x: np.ndarray) -> Prediction:
        batches.append(x[:, 0].tolist())
        release.wait(WAY_OUT_S)
        return toy_model(x)

    async def scenario() -> None:
        batcher = MicroBatcher(slow, max_batch_size=4, max_wait_s=0, max_queue_samples=16)
        batcher.start()
        running = asyncio.ensure_future(batcher.submit(np.full((1, 1), 1.0, np.float32)))
        while not batches:  # the first batch has reached the model's thread
            await asyncio.sleep(0.001)
        late = batcher.submit(np.full((1, 1), 2.0, np.float32), time.monotonic() + 0.01)
        with pytest.raises(Overloaded, match="deadline passed"):
            await late
        abandoned = asyncio.ensure_future(batcher.submit(np.full((1, 1), 3.0, np.float32)))
        await asyncio.sleep(0)
        abandoned.cancel()
        served = asyncio.ensure_future(batcher.submit(np.full((1, 1), 4.0, np.float32)))
        release.set()
        assert (await running).scores.tolist() == [1.0]
        assert (await served).scores.tolist() == [4.0]
        await batcher.close()
        assert batcher.queued_samples == 0

    asyncio.run(scenario())
    assert batches == [[1.0], [4.0]]


# --- over HTTP ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tight_server(
    store: Path, spawn_server: ServerFactory, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """A server with the smallest budgets: bodies for one largest request and 80 kB more, one
    place, one waiter; slow clients are cut after 3 s; no API keys; models' own body limits."""
    with spawn_server(
        store,
        tmp_path_factory.mktemp("tight"),
        models=MODEL,
        reload_interval_s="0",
        max_inflight_body_bytes=str(BUDGET),
        max_inflight_requests="1",
        max_waiting_requests="1",
        read_timeout_s="3",  # 30 × the trickle's gap: a loaded machine never cuts it early
        body_total_timeout_s="600",  # the hog below trickles for as long as the test needs
    ) as server:
        yield server


def assert_shed_properly(status: int, headers: dict[str, str], body: bytes) -> None:
    assert status == 503, body
    assert headers["retry-after"] == "1"
    assert headers["content-type"] == "application/json"
    assert "retry later" in orjson.loads(body)["error"]


def test_a_burst_beyond_the_budget_is_shed_with_retry_after(tight_server: Server) -> None:
    """A slow upload of the largest legal size, nearly all of it sent, holds most of the body
    budget (it keeps sending, so the read time-out spares it): every request of a burst of
    32-image bodies (more than the 80 kB left) is then refused, 503 with Retry-After and a JSON
    message.
    Once the upload stalls, it is cut and the same burst is served; nothing but 200 and 503 is
    ever answered. The metrics show the reservation against the budget while it is held, and
    count every 503 of the burst as shed for body bytes (and as a 5xx)."""
    body = orjson.dumps({"inputs": np.full((32, *SHAPE), 0.5, dtype=np.float32).tolist()})
    assert len(body) > BUDGET - JSON_LIMIT
    burst = 16
    stop = threading.Event()
    before = scrape(tight_server.url, timeout=WAY_OUT_S)
    with connect(tight_server) as hog:
        # bytes are charged as they arrive: the hog sends nearly all its body, then trickles
        hog.sendall(request_head(V1, JSON_LIMIT) + b'{"inputs": [' + b" " * (JSON_LIMIT - 2000))
        sender = trickle(hog, stop)
        try:
            # Bytes are charged as the server reads them: a burst sent before it has read the
            # hog's would take the budget first and shed the hog instead. So wait for them.
            def charged() -> float:
                held = scrape(tight_server.url, timeout=WAY_OUT_S)
                return total(held, "marginwatch_admission_body_bytes")

            assert eventually(lambda: charged() >= JSON_LIMIT - 2000), charged()
            status = post(tight_server, V1, body)[0]
            assert status == 503, status
            with ThreadPoolExecutor(burst) as pool:
                shed = list(pool.map(lambda _: post(tight_server, V1, body), range(burst)))
            held = scrape(tight_server.url, timeout=WAY_OUT_S)
        finally:
            stop.set()
            sender.join()
        assert closed_by_server(hog)  # stalled past the read time-out
    for response in shed:
        assert_shed_properly(*response)
    assert total(held, "marginwatch_admission_body_bytes") >= JSON_LIMIT - 2000
    assert total(held, "marginwatch_admission_limit", budget="body_bytes") == BUDGET
    assert total(held, "marginwatch_admission_limit", budget="requests") == 1
    assert total(held, "marginwatch_admission_limit", budget="waiting") == 1
    shed_by = {
        reason: total(held, "marginwatch_requests_shed_total", reason=reason)
        - total(before, "marginwatch_requests_shed_total", reason=reason)
        for reason in SHED_REASONS
    }
    errors = total(held, "marginwatch_requests_total", status_class="5xx") - total(
        before, "marginwatch_requests_total", status_class="5xx"
    )
    assert shed_by["body_bytes"] >= burst + 1, shed_by  # the burst, and the probe's last one
    assert errors == sum(shed_by.values()), (errors, shed_by)  # every 5xx was a shed request
    assert total(held, "marginwatch_requests_shed_total", model=MODEL, endpoint="v1_predict",
                 reason="body_bytes") >= burst + 1  # fmt: skip
    with ThreadPoolExecutor(burst) as pool:
        after = list(pool.map(lambda _: post(tight_server, V1, body), range(burst)))
    statuses = [status for status, _, _ in after]
    assert set(statuses) <= {200, 503} and 200 in statuses, statuses
    for response in after:
        if response[0] == 503:  # one place and one waiter: a burst may outrun them
            assert_shed_properly(*response)


@pytest.mark.parametrize(
    "stall",
    [b"", b"POST /v1/models/fmnist/predict HTTP/1.1\r\nHost: test\r\nContent-Len",
     request_head(V1, 6931) + b'{"inputs": [[[[0.5, 0.5'],
    ids=["nothing-sent", "half-the-headers", "half-the-body"],
)  # fmt: skip
def test_a_stalled_client_is_disconnected_while_others_are_served(
    tight_server: Server, stall: bytes
) -> None:
    with connect(tight_server) as stalled:
        stalled.sendall(stall)
        status, _, _ = post(tight_server, V1, one_image())
        assert status == 200
        assert closed_by_server(stalled)
    assert post(tight_server, V1, one_image())[0] == 200


@pytest.mark.parametrize(
    ("path", "binary", "extra"),
    [(V1, False, {}), (V2, False, {}), (V2, True, {"Inference-Header-Content-Length": "100"})],
    ids=["v1-json", "v2-json", "v2-binary"],
)
def test_a_body_above_the_models_limit_is_refused_before_it_is_sent(
    tight_server: Server, path: str, binary: bool, extra: dict[str, str]
) -> None:
    """Only the headers go out: the 413 comes back without the body, and names the limit derived
    from the model (64 inputs of 1×28×28, as JSON or binary FP32)."""
    limit = body_limit(SHAPE, MAX_INPUTS, binary=binary)
    assert limit == (MAX_INPUTS * 784 * 4 + 65536 if binary else JSON_LIMIT)
    with connect(tight_server) as connection:
        connection.sendall(request_head(path, limit + 1, **extra))
        status, _, body = read_response(connection)
    assert status == 413, body
    message = orjson.loads(body)["error"]
    assert f"{limit + 1} bytes, above the limit of {limit} bytes for model 'fmnist'" in message
    assert ("binary FP32" if binary else "JSON") in message


def test_the_largest_legal_bodies_are_accepted(tight_server: Server) -> None:
    """64 inputs of the longest floats JSON has for values in [0, 1], and the same as binary,
    fit their limits."""
    tiny = np.float32(1.1754944e-38)  # written "1.1754943508222875e-38" as a float64
    batch = np.full((MAX_INPUTS, *SHAPE), tiny, dtype=np.float32)
    as_json = json.dumps({"inputs": batch.tolist()}).encode()  # ", " between values
    assert len(as_json) > 0.9 * body_limit(SHAPE, MAX_INPUTS, binary=False)
    assert post(tight_server, V1, as_json)[0] == 200
    raw = batch.tobytes()
    header = orjson.dumps({"inputs": [{"name": "input", "shape": list(batch.shape),
                                       "datatype": "FP32",
                                       "parameters": {"binary_data_size": len(raw)}}]})  # fmt: skip
    with connect(tight_server) as connection:
        connection.sendall(
            request_head(V2, len(header) + len(raw), **{"Inference-Header-Content-Length":
                                                        str(len(header))}) + header + raw
        )  # fmt: skip
        assert read_response(connection)[0] == 200
