"""The separate /metrics listener (`metrics_port`): prometheus_client's handler on a threaded
HTTP server of bounded size.

prometheus_client's own `start_http_server` starts a thread per connection and reads without a
time-out: 4,000 connections that sent half a request line held 4,006 threads (issue 19). Here:

- at most `max_connections` connections are served at once; one more is closed as it is
  accepted (a scraper retries at its next interval; nothing queues behind a full server);
- each connection has `read_timeout_s` in all, from its acceptance, to send its request (a
  total, so trickling bytes does not extend it; the scrape's answer is written within it too,
  for a text of a few kilobytes), and no read waits longer than that either.

So the listener holds at most `max_connections` handler threads, each for at most
`read_timeout_s`, plus one timer thread each while it lives. The port takes no API keys
(`settings.py`): a NetworkPolicy decides who reaches it.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
from http.server import ThreadingHTTPServer
from typing import Any, ClassVar

from prometheus_client.exposition import MetricsHandler
from prometheus_client.registry import CollectorRegistry

METRICS_MAX_CONNECTIONS = 32  # a few scrapers, each with one connection at a time


class _BoundedHandler(MetricsHandler):
    """`MetricsHandler` whose connection is shut down `timeout` seconds after it was accepted,
    whatever it is doing then (a blocked read returns at once)."""

    timeout: ClassVar[float]  # set on the socket by StreamRequestHandler: the longest read

    def setup(self) -> None:
        super().setup()
        self._expiry = threading.Timer(self.timeout, self._expire)
        self._expiry.daemon = True
        self._expiry.start()

    def finish(self) -> None:
        self._expiry.cancel()
        with contextlib.suppress(OSError):  # the client may be gone already
            super().finish()

    def _expire(self) -> None:
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)


class _BoundedServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the listen backlog: connections over the cap are closed quickly

    def __init__(self, address: tuple[str, int], handler: type[Any], max_connections: int) -> None:
        self._slots = threading.BoundedSemaphore(max_connections)
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # over the cap: closed at once, no thread
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return  # the client left (or was cut off) mid-answer: nothing worth a traceback
        super().handle_error(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class MetricsPort:
    """`registry`'s exposition on `host:port`, served from a thread; `start()`, then `stop()`."""

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str,
        port: int,
        *,
        read_timeout_s: float,
        max_connections: int = METRICS_MAX_CONNECTIONS,
    ) -> None:
        self._handler = type("MetricsPortHandler", (_BoundedHandler,), {
            "registry": registry, "timeout": read_timeout_s,
        })  # fmt: skip
        self._address = (host, port)
        self._max_connections = max_connections
        self._server: _BoundedServer | None = None

    def start(self) -> None:
        """Bind (raises if the port is taken: start-up fails) and serve from a thread."""
        self._server = _BoundedServer(self._address, self._handler, self._max_connections)
        threading.Thread(
            target=self._server.serve_forever, name="metrics-port", daemon=True
        ).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
