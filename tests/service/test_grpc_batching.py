"""gRPC calls batched together and with HTTP requests (issue 21, item 4).

`grpc.aio` hands the event loop one new call per round trip, so concurrent gRPC calls never meet
in one loop turn as HTTP requests do: the servicer tells the batcher how many calls are in
progress (`company`), and a batch waits briefly for them. Against a real server, calls of both
transports land in one batch, read off the `marginwatch_batch_size` histogram of /metrics; with
the toy model, the batcher's rules for company, each one deterministic (the waits are long or
never needed). Like test_grpc.py, this module never imports the service's own stubs: the
requests are built with tritonclient's (see service/oip_grpc/README.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import httpx
import numpy as np
import pytest
import uvloop
from ports import free_port
from tritonclient.grpc import service_pb2

from marginwatch.service.batcher import MicroBatcher, RunBatch
from marginwatch.service.engine import Prediction
from metrics_text import scrape, value

if TYPE_CHECKING:
    from conftest import Server, ServerFactory

MODEL = "fmnist"
INFER = "/inference.GRPCInferenceService/ModelInfer"
GRPC_CALLS, HTTP_CALLS = 8, 4
BATCH = GRPC_CALLS + HTTP_CALLS  # the server's max_batch_size: the batch goes once all are in
ONE = np.zeros((1, 1), dtype=np.float32)


# --- a real server ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batching_server(
    store: Path, tmp_path_factory: pytest.TempPathFactory, spawn_server: ServerFactory
) -> Iterator[tuple[Server, str]]:
    """A batch waits up to a second to fill and is full at BATCH samples: calls sent together
    form one batch whatever the machine's speed (it goes the moment the last one is in)."""
    port = free_port()
    with spawn_server(
        store,
        tmp_path_factory.mktemp("grpc-batching-logs"),
        models=MODEL,
        reload_interval_s="0",
        grpc_port=str(port),
        max_batch_size=str(BATCH),
        max_inputs_per_request=str(BATCH),
        max_batch_wait_s="1",
        request_timeout_s="60",
    ) as server:
        yield server, f"127.0.0.1:{port}"


def grpc_message(batch: np.ndarray) -> bytes:
    request = service_pb2.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="input", datatype="FP32", shape=batch.shape)
    request.raw_input_contents.append(batch.astype("<f4").tobytes())
    return bytes(request.SerializeToString())


def http_body(batch: np.ndarray) -> dict[str, object]:
    return {"inputs": [{"name": "input", "shape": list(batch.shape), "datatype": "FP32",
                        "data": batch.ravel().tolist()}]}  # fmt: skip


def grpc_label(raw: bytes) -> int:
    response = service_pb2.ModelInferResponse.FromString(raw)
    names = [output.name for output in response.outputs]
    (label,) = np.frombuffer(response.raw_output_contents[names.index("label")], "<i8")
    return int(label)


def http_label(response: httpx.Response) -> int:
    assert response.status_code == 200, response.text
    outputs = {output["name"]: output["data"] for output in response.json()["outputs"]}
    (label,) = outputs["label"]
    return int(label)


def batch_totals(url: str) -> tuple[float, float]:
    """Executions of the model so far, and the samples they held (/metrics)."""
    samples = scrape(url)
    count, total = (
        value(samples, f"marginwatch_batch_size_{kind}", model=MODEL) or 0.0
        for kind in ("count", "sum")
    )
    return count, total


async def both_transports(url: str, target: str, images: np.ndarray) -> list[int]:
    """GRPC_CALLS gRPC calls on one channel and HTTP_CALLS HTTP requests, all sent at once,
    each with its own image; the label each got back, in image order. A full batch first, on
    each transport, opens the connections (it fills a batch by itself: no wait)."""
    async with (
        grpc.aio.insecure_channel(target) as channel,
        httpx.AsyncClient(base_url=url, timeout=60) as http,
    ):
        infer = channel.unary_unary(INFER)  # bytes in, bytes out
        path = f"/v2/models/{MODEL}/infer"
        await infer(grpc_message(images[:BATCH]))
        assert (await http.post(path, json=http_body(images[:BATCH]))).status_code == 200
        before = batch_totals(url)
        calls = [infer(grpc_message(images[i : i + 1])) for i in range(GRPC_CALLS)]
        posts = [
            http.post(path, json=http_body(images[i : i + 1])) for i in range(GRPC_CALLS, BATCH)
        ]
        answers = await asyncio.gather(*calls, *posts)
        after = batch_totals(url)
    # one execution held every call: the gRPC calls' samples and the HTTP requests'
    assert (after[0] - before[0], after[1] - before[1]) == (1, BATCH)
    return [grpc_label(raw) for raw in answers[:GRPC_CALLS]] + [
        http_label(response) for response in answers[GRPC_CALLS:]
    ]


def test_grpc_calls_and_http_requests_share_one_batch(
    batching_server: tuple[Server, str],
    images: np.ndarray,
    reference: tuple[np.ndarray, np.ndarray],
) -> None:
    server, target = batching_server
    labels = asyncio.run(both_transports(server.url, target, images))
    # each call got its own row back: the labels ONNX Runtime gives each image
    assert labels == reference[0][:BATCH].argmax(axis=1).tolist()
    samples = scrape(server.url)
    # the batch of BATCH samples shows in the histogram: above 8 (every gRPC call) and 4 (HTTP)
    assert value(samples, "marginwatch_batch_size_bucket", model=MODEL, le="8.0") == 0
    assert value(samples, "marginwatch_batch_size_bucket", model=MODEL, le="16.0") == 3


# --- the batcher's rules for company ---------------------------------------------------------


def recording(toy_model: RunBatch, sizes: list[int]) -> RunBatch:
    """`toy_model` that records each batch's size."""

    def run(x: np.ndarray) -> Prediction:
        sizes.append(len(x))
        return toy_model(x)

    return run


def batcher(run: RunBatch, gather_s: float) -> MicroBatcher:
    """Defaults of the service: no wait to fill, small batches inline."""
    return MicroBatcher(run, max_batch_size=64, max_wait_s=0, max_queue_samples=256,
                        inline_max_samples=64, gather_s=gather_s)  # fmt: skip


async def turns(count: int) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


def test_a_call_that_expects_company_waits_for_it_and_others_join(toy_model: RunBatch) -> None:
    """A gRPC call that found another in progress waits for it (the wait is a minute long: only
    company ends it); the next batch expects as much company as this one had, and an HTTP
    request (no company of its own) completes it. That batch had one gRPC call, and HTTP
    requests are not remembered: the next lone call goes at once (were it to wait, the 30 s
    time-out would fail the test long before the minute)."""
    sizes: list[int] = []

    async def scenario() -> None:
        served = batcher(recording(toy_model, sizes), gather_s=60)
        served.start()
        first = asyncio.ensure_future(served.submit(ONE, company=2))
        await turns(10)
        assert not first.done() and not sizes  # waiting for the second call
        await asyncio.gather(first, served.submit(ONE, company=2))
        third = asyncio.ensure_future(served.submit(ONE, company=1))  # alone in progress, but
        await turns(10)  # the last batch had company: it waits for as much
        assert not third.done()
        await asyncio.gather(third, served.submit(ONE))  # an HTTP request joins it
        await asyncio.wait_for(served.submit(ONE, company=1), 30)
        await served.close()

    asyncio.run(scenario())
    assert sizes == [2, 2, 1]


def test_a_wait_that_finds_nobody_ends_the_waiting(toy_model: RunBatch) -> None:
    """After a wait for company that ended alone, a lone call is served at once, without even
    a loop turn (the lone-request path), as at concurrency 1, where calls never overlap."""
    sizes: list[int] = []

    async def scenario() -> None:
        served = batcher(recording(toy_model, sizes), gather_s=0.005)
        served.start()
        for _ in range(MicroBatcher.ALONE_STREAK):  # one at a time: batches of one
            await served.submit(ONE, company=1)
        await served.submit(ONE, company=2)  # expects company that never comes: alone
        marks: list[bool] = []
        asyncio.get_running_loop().call_soon(marks.append, True)
        await served.submit(ONE, company=1)
        assert not marks  # served without giving the loop a turn: no wait
        await served.close()

    asyncio.run(scenario())
    assert sizes == [1] * (MicroBatcher.ALONE_STREAK + 2)


def test_a_wait_ends_once_under_uvloop(toy_model: RunBatch) -> None:
    """uvloop sets a timer in whole milliseconds of the loop's cached clock, which lags
    `time.monotonic()` (by the turn's work so far): the timer fires before the batch's deadline
    as the batcher reads it. A dispatch that then waited again (by `call_soon`, below half a
    millisecond) spun the loop until the deadline: up to hundreds of dispatches, in 8 of 10
    such 50 ms waits. Now the first dispatch starts the wait and the timer's ends it (only a
    dispatch that comes after the deadline, on a stalled machine, finds no wait to start)."""
    dispatches: list[bool] = []  # each dispatch: whether it ends a wait

    class Counting(MicroBatcher):
        def _dispatch(self, waited: bool = False) -> None:
            dispatches.append(waited)
            super()._dispatch(waited)

    async def one_wait() -> list[bool]:
        served = Counting(toy_model, max_batch_size=8, max_wait_s=0.05, max_queue_samples=8)
        served.start()
        dispatches.clear()
        await served.submit(ONE)
        seen = list(dispatches)  # before close(), which dispatches what is left (nothing)
        await served.close()
        return seen

    for _ in range(5):  # a fresh loop each time, as at start-up: its clock lags the most
        assert uvloop.run(one_wait()) in ([False, True], [False])
