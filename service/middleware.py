"""The request middleware: counts and times every HTTP request once routing has named it.

Pure ASGI rather than Starlette's `BaseHTTPMiddleware`, which runs the app in a task of its own
and streams the response through a memory channel on every request. Label values come from fixed
sets only: a model label is a served model's name (never a name taken from a path that no model
has), an endpoint label is a route's name.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, MutableMapping
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.routing import BaseRoute, Route

from marginwatch.service.admission import ARRIVED, TICKET, Admission
from marginwatch.service.metrics import ServiceMetrics

UNKNOWN_MODEL = "_unknown"
SHED = "marginwatch.shed"  # ASGI scope key: why the request was shed (`errors.ShedReason`)
OTHER_ENDPOINT = "other"
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before being answered

logger = logging.getLogger("marginwatch.service")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class RequestMetricsMiddleware:
    """Records each HTTP request's model, endpoint, status and duration in `ServiceMetrics`.

    `unhandled_status` is what a request counts as when the app raises instead of answering:
    the status the app's error table gives unhandled errors, answered further out.
    """

    def __init__(
        self,
        app: ASGIApp,
        metrics: ServiceMetrics,
        known: Callable[[str], bool],
        unhandled_status: int,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.known = known
        self.unhandled_status = unhandled_status

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = self.unhandled_status

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        except ClientDisconnect:
            status = self._client_gone(scope)
        finally:
            self._record(scope, status, time.perf_counter() - started)

    def _client_gone(self, scope: Scope) -> int:
        """The status of a request whose client closed the connection before its body was read.
        That is the client's doing: no server error, no traceback, and nothing to answer (the
        ASGI server drops what is sent to a closed connection), so it is swallowed here."""
        self.metrics.observe_disconnect()
        logger.info("client disconnected while sending %s %s", scope["method"], scope["path"])
        return CLIENT_CLOSED_REQUEST

    def _record(self, scope: Scope, status: int, seconds: float) -> None:
        route = scope.get("route")
        endpoint = getattr(route, "name", None) or OTHER_ENDPOINT
        name = scope.get("path_params", {}).get("name")
        model = name if isinstance(name, str) and self.known(name) else UNKNOWN_MODEL
        if name is None:
            model = ""
        self.metrics.observe_request(model, endpoint, status, seconds, scope.get(SHED))


class AdmissionGuard:
    """Wraps an inference route's ASGI app: opens the request's admission ticket, through which
    `payload.RequestReader` reserves body bytes and takes a place (`admission.py`), and closes it
    however the route ends, so whatever the request held is given back once it is answered."""

    def __init__(self, app: ASGIApp, admission: Admission) -> None:
        self.app = app
        self.admission = admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ticket = self.admission.open(scope.get(ARRIVED))
        scope[TICKET] = ticket
        try:
            await self.app(scope, receive, send)
        finally:
            ticket.close()


def guard_routes(routes: Iterable[BaseRoute], names: Collection[str], admission: Admission) -> None:
    """Put an `AdmissionGuard` in front of the routes named `names` (the inference routes)."""
    for route in routes:
        if isinstance(route, Route) and route.name in names:
            route.app = AdmissionGuard(route.app, admission)
