"""The HTTP connection: uvicorn's httptools protocol, plus read time-outs for slow clients and
eager accepting of new connections.

uvicorn (0.54) times a connection out only when it idles between requests (`timeout_keep_alive`).
A client that connects and sends nothing, or half a request's headers, or part of a body and then
stalls, holds its connection (and, mid-body, a request in progress) for as long as it likes; a
few hundred of them are a cheap denial of service. Here, with `read_timeout_s` = T:

- a new connection must start a request within T;
- a request's headers must all arrive within T of its first byte (a total: trickling bytes
  does not extend it);
- a body may not pause longer than T between two reads (a gap: a slow but steady upload goes on).

Past any of these the connection is closed; nothing is answered, since the request never arrived
in full (an application that was reading the body sees the client disconnect). One timer per
connection, armed when a request (or the connection) starts and re-armed only when it fires, so a
request that arrives at once, as nearly all do, costs no timer of its own.

Eager accepting. uvloop's libuv accepts one connection per turn of the event loop, and under load a
turn takes tens of milliseconds (it runs every request's callbacks that became ready): at
concurrency 1,000 the listen queue drained at about 20 connections a second, and wrk timed out on
the rest (docs/benchmarks.md, "Overload and memory"). So whenever libuv hands over a connection,
the protocol also accepts every other one waiting on the listening socket (`listener`, set by
`marginwatch-serve`, which binds it), at most `ACCEPT_BATCH`, as asyncio's own loop does. It costs
one `accept` that finds none waiting per connection, nothing per request.

It also stamps each request's scope with the time its headers arrived (`admission.ARRIVED`), from
which its deadline counts, and, once the whole request has arrived, with `admission.BODY_RECEIVED`:
a body that is all there when the app starts reading it (nearly every one) needs no time-out
timer of its own (`payload.RequestReader`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import time
from typing import ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from marginwatch.service.admission import ARRIVED, BODY_RECEIVED

logger = logging.getLogger("marginwatch.service")
ACCEPT_BATCH = 2048  # uvicorn's listen backlog: all that can be waiting


class ReadTimeoutProtocol(HttpToolsProtocol):
    """`HttpToolsProtocol` that closes connections whose client is too slow to send a request."""

    read_timeout_s: ClassVar[float] = 5.0
    listener: ClassVar[socket.socket | None] = None  # the listening socket, to accept eagerly
    # connections being set up (their tasks are kept here: the loop holds tasks only weakly)
    accepting: ClassVar[set[asyncio.Task[object]]]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._read_timer: asyncio.TimerHandle | None = None
        self._started = self._last_read = self.loop.time()
        self._fresh = True  # no request begun yet
        self._in_request = False  # between a request's first byte and its last
        self._in_headers = False
        self._draining = False  # the server is shutting down (`shutdown`)
        self._arm(self.read_timeout_s)
        if self.listener is not None:
            self._accept_waiting(self.listener)

    def _accept_waiting(self, listener: socket.socket) -> None:
        """Accept the connections waiting on `listener` (non-blocking), each into a protocol
        like this one."""
        sibling = functools.partial(
            type(self), config=self.config, server_state=self.server_state, app_state=self.app_state
        )
        for _ in range(ACCEPT_BATCH):
            try:
                connection, _ = listener.accept()
            except OSError:  # none waiting; or closed at shutdown, out of descriptors (libuv copes)
                return
            connection.setblocking(False)
            task = self.loop.create_task(self.loop.connect_accepted_socket(sibling, connection))
            self.accepting.add(task)
            task.add_done_callback(self._accepted)

    def _accepted(self, task: asyncio.Task[object]) -> None:
        self.accepting.discard(task)
        if not task.cancelled() and task.exception() is not None:  # the client left at once
            logger.debug("an accepted connection failed to set up: %s", task.exception())

    def connection_lost(self, exc: Exception | None) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._last_read = self.loop.time()
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._started = self._last_read
        self._fresh = False
        self._in_request = self._in_headers = True
        if self._read_timer is None:
            self._arm(self.read_timeout_s)

    def on_headers_complete(self) -> None:
        self._in_headers = False
        # a request's deadline counts from here, not from when the app gets to it: under load
        # the new request's task waits its turn in the event loop (admission.py)
        self.scope[ARRIVED] = time.monotonic()  # type: ignore[literal-required]
        super().on_headers_complete()
        if self._draining:  # answered, then the connection closes (`shutdown`)
            self.cycle.keep_alive = False

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown, without closing an idle keep-alive connection at once:
        a client that sent a request on it just then (before it could see the close) got a
        connection reset. Now the connection stays open until its keep-alive (or, fresh, its
        read) time-out closes it, as when the server is not stopping; a request that arrives
        meanwhile is served, its response saying `Connection: close`. A request in flight is
        answered with `Connection: close`, as before. Shutdown waits for these connections (at
        most the time-out, within `shutdown_timeout_s`)."""
        self._draining = True
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False

    def on_message_complete(self) -> None:
        self._in_request = False
        self.scope[BODY_RECEIVED] = True  # type: ignore[literal-required]
        super().on_message_complete()

    def _arm(self, delay: float) -> None:
        self._read_timer = self.loop.call_later(delay, self._check_reads)

    def _check_reads(self) -> None:
        self._read_timer = None
        if self.transport.is_closing() or not (self._fresh or self._in_request):
            return  # between requests uvicorn's keep-alive time-out watches the connection
        if self._in_headers or self._fresh:
            deadline, what = self._started + self.read_timeout_s, "request headers"
        else:
            deadline, what = self._last_read + self.read_timeout_s, "more of the request body"
        remaining = deadline - self.loop.time()
        if remaining > 0:
            self._arm(remaining)
            return
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        logger.info(
            "closed the connection from %s: no %s within %g s", client, what, self.read_timeout_s
        )
        self.transport.close()


def timed_protocol(read_timeout_s: float) -> type[ReadTimeoutProtocol]:
    """The protocol class to give uvicorn (`http=`), with its read time-out set; set its
    `listener` to accept eagerly."""

    class Timed(ReadTimeoutProtocol):
        pass

    Timed.read_timeout_s = read_timeout_s
    Timed.accepting = set()
    return Timed
