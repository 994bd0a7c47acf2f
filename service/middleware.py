"""The request middleware: counts and times every HTTP request once routing has named it.

Pure ASGI rather than Starlette's `BaseHTTPMiddleware`, which runs the app in a task of its own
and streams the response through a memory channel on every request (see `fastpath.py`). Label
values come from fixed sets only: a model label is a served model's name (never a name taken
from a path that no model has), an endpoint label is a route's name.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from marginwatch.service.metrics import ServiceMetrics

UNKNOWN_MODEL = "_unknown"
OTHER_ENDPOINT = "other"

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
        finally:
            self._record(scope, status, time.perf_counter() - started)

    def _record(self, scope: Scope, status: int, seconds: float) -> None:
        route = scope.get("route")
        endpoint = getattr(route, "name", None) or OTHER_ENDPOINT
        name = scope.get("path_params", {}).get("name")
        model = name if isinstance(name, str) and self.known(name) else UNKNOWN_MODEL
        if name is None:
            model = ""
        self.metrics.observe_request(model, endpoint, status, seconds)
