"""Admission control: how much inference work the process takes on at once, decided before the
expensive part of a request (reading a large body, parsing it, running the model).

Two budgets for the whole process, since every model shares its CPU and its memory:

- **Body bytes** (`max_body_bytes`). A request's body bytes are charged as they arrive (a gRPC
  message, which arrives whole, at once) and kept until its response is sent. A chunk that does
  not fit is refused at once: while it waited, the rest of the body would sit in the HTTP
  server's buffers, where no budget sees it. Charging the declared Content-Length up front let
  77 clients that declared 1.3 MB each and sent a byte every 3.5 s hold the whole budget, and
  every other request was refused (issue 19); now such a client holds what it sent, and the
  request reader's total body time-out ends it. A declared length that could never fit is
  refused (413) before the body is read.
- **Places** (`max_requests`). A request takes one once its body has arrived, before it is
  parsed, and keeps it until its response is sent; so a client that stalls half-way through its
  body holds bytes but no place. A request that finds every place taken waits, first come first
  served, if fewer than `max_waiting` are waiting; else it is refused.

Every request has a deadline, `timeout_s` after its headers arrived: its batch must start by then
(the batcher drops it otherwise, never running it). A waiting request gives up earlier, once less
time is left than requests have lately taken from their place to their response (`service_s`, a
moving average): admitted then, it would be parsed only to miss its deadline. Giving up, like any
refusal here, is `Overloaded` (503 with Retry-After).

Why a request waits for a place rather than being refused at once: a client that retries at once
(a load generator, a naive retry loop) turns every quick refusal into a new request, and
answering those takes the CPU that the model needs. A wait bounded by the deadline refuses only
what cannot be served in time (docs/benchmarks.md, "Overload and memory").

Each request gets a `Ticket` (`Admission.open`): the inference routes' guard
(`middleware.AdmissionGuard`) opens it, the request reader reserves and takes through it, and
the guard closes it once the response is sent, which gives back whatever it holds. Everything
here runs on the event loop's thread.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

from marginwatch.service.errors import Overloaded, PayloadTooLarge

TICKET = "marginwatch.admission"  # ASGI scope key: the request's `Ticket`
ARRIVED = "marginwatch.arrived"  # ASGI scope key: when its headers arrived (`protocol.py`)
# ASGI scope key: the HTTP server holds the request's whole body (`protocol.py`), so reading it
# cannot wait (`payload.RequestReader` then arms no body time-out)
BODY_RECEIVED = "marginwatch.body_received"
SERVICE_SMOOTHING = 0.05  # weight of the newest request in `service_s`


class Admission:
    """The process's two budgets and the queue of requests waiting for a place."""

    def __init__(
        self, *, max_requests: int, max_body_bytes: int, max_waiting: int, timeout_s: float
    ) -> None:
        if max_requests <= 0 or max_body_bytes <= 0 or max_waiting < 0 or timeout_s <= 0:
            raise ValueError("need max_requests, max_body_bytes, timeout_s > 0; max_waiting >= 0")
        self.max_requests = max_requests
        self.max_body_bytes = max_body_bytes
        self.max_waiting = max_waiting
        self.timeout_s = timeout_s
        self.service_s = 0.0  # how long requests lately held their place
        self._free_places = max_requests
        self._free_bytes = max_body_bytes
        # Futures of waiting requests, oldest first. One that gave up (timed out, cancelled) is
        # done and stays until a freed place skips it; `_waiting` counts the live ones.
        self._queue: deque[asyncio.Future[None]] = deque()
        self._waiting = 0

    @property
    def requests(self) -> int:
        """Requests holding a place."""
        return self.max_requests - self._free_places

    @property
    def body_bytes(self) -> int:
        """Body bytes reserved."""
        return self.max_body_bytes - self._free_bytes

    @property
    def waiting(self) -> int:
        return self._waiting

    def open(self, arrived: float | None = None) -> Ticket:
        """A ticket for a request that arrived at `arrived` (`time.monotonic`; default: now)."""
        return Ticket(self, (arrived or time.monotonic()) + self.timeout_s)

    def _check_size(self, size: int) -> None:
        if size > self.max_body_bytes:
            # could never fit, so not worth a retry: it is a body too large for this process
            raise PayloadTooLarge(
                f"the body has {size} bytes; this server holds at most {self.max_body_bytes} "
                "bytes of request bodies at once"
            )

    def _reserve_bytes(self, size: int) -> None:
        self._check_size(size)
        if size > self._free_bytes:
            raise Overloaded(
                f"{self.body_bytes} bytes of request bodies are being processed (limit "
                f"{self.max_body_bytes}); retry later",
                "body_bytes",
            )
        self._free_bytes -= size

    def _release_bytes(self, size: int) -> None:
        self._free_bytes += size

    def _take_free_place(self) -> bool:
        if self._free_places > 0:  # a freed place goes to a waiter first, so none is waiting
            self._free_places -= 1
            return True
        return False

    async def _take_place(self, deadline: float) -> None:
        if self._take_free_place():
            return
        if self._waiting >= self.max_waiting:
            raise Overloaded(
                f"{self.max_requests} requests in progress and {self._waiting} waiting (limit "
                f"{self.max_waiting}); retry later",
                "waiting_full",
            )
        give_up_at = deadline - self.service_s
        await self._wait_for_place(give_up_at)
        if time.monotonic() > give_up_at:
            # handed a place, but the loop got back to the request too late to serve it in time:
            # refused now, before it is parsed, rather than in its model's queue
            self._release_place()
            raise self._too_late()

    async def _wait_for_place(self, give_up_at: float) -> None:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._queue.append(waiter)
        self._waiting += 1
        timer = loop.call_later(max(0.0, give_up_at - time.monotonic()), self._give_up, waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._release_place()  # handed a place just as the wait was abandoned
            raise
        finally:
            timer.cancel()
            self._waiting -= 1

    def _give_up(self, waiter: asyncio.Future[None]) -> None:
        if not waiter.done():
            waiter.set_exception(self._too_late())

    def _too_late(self) -> Overloaded:
        return Overloaded(
            f"no place for the request in time for its {self.timeout_s:g} s deadline "
            f"({self.max_requests} requests in progress); retry later",
            "deadline",
        )

    def _release_place(self) -> None:
        """Hand the place to the oldest live waiter, else free it."""
        while self._queue:
            waiter = self._queue.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free_places += 1

    def _observe_service(self, seconds: float) -> None:
        self.service_s += SERVICE_SMOOTHING * (seconds - self.service_s)


class Ticket:
    """What one request holds: reserved body bytes and perhaps a place."""

    __slots__ = ("_admission", "_bytes", "_placed_at", "deadline")

    def __init__(self, admission: Admission, deadline: float) -> None:
        self._admission = admission
        self._bytes = 0
        self._placed_at: float | None = None  # when it took its place
        self.deadline = deadline  # when its batch must have started (time.monotonic)

    def check_size(self, size: int) -> None:
        """Raise `PayloadTooLarge` if a body of `size` bytes could never fit the budget."""
        self._admission._check_size(self._bytes + size)

    def reserve_bytes(self, size: int) -> None:
        """Reserve `size` body bytes, or raise `Overloaded` (no room now) or `PayloadTooLarge`
        (never room)."""
        self._admission._reserve_bytes(size)
        self._bytes += size

    def take_free_place(self) -> bool:
        """Take a place if one is free (no waiting: no coroutine for the usual case)."""
        if self._placed_at is None and self._admission._take_free_place():
            self._placed_at = time.monotonic()
        return self._placed_at is not None

    async def take_place(self) -> None:
        """Take a place, waiting for one while the deadline can still be met; or raise
        `Overloaded`. (`take_free_place` first spares the usual case a coroutine.)"""
        if self._placed_at is None:
            await self._admission._take_place(self.deadline)
            self._placed_at = time.monotonic()

    def close(self) -> None:
        """Give back what the ticket holds (idempotent)."""
        admission = self._admission
        if self._bytes:
            admission._release_bytes(self._bytes)
            self._bytes = 0
        if self._placed_at is not None:
            admission._observe_service(time.monotonic() - self._placed_at)
            self._placed_at = None
            admission._release_place()


def ticket_of(scope: Mapping[str, Any]) -> Ticket | None:
    """The request's ticket; None where no guard opened one (an app built without admission)."""
    ticket: Ticket | None = scope.get(TICKET)
    return ticket


def deadline_of(scope: Mapping[str, Any]) -> float | None:
    """When the request's batch must have started (`time.monotonic`); None: no deadline."""
    ticket: Ticket | None = scope.get(TICKET)
    return None if ticket is None else ticket.deadline
