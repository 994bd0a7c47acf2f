"""The request middleware: counts and times every HTTP request once routing has named it; and the
inference routes' own ASGI app (`guard_routes`): admission, then the endpoint called directly.

Pure ASGI rather than Starlette's `BaseHTTPMiddleware`, which runs the app in a task of its own
and streams the response through a memory channel on every request. Label values come from fixed
sets only: a model label is a served model's name (never a name taken from a path that no model
has), an endpoint label is a route's name.

A speed device (docs/benchmarks.md, "Where the microseconds go"): an inference route's endpoint
takes the `Request` alone and returns a finished `Response`, and its only dependency is the API
key check, which takes the `Request` alone too; for such a route FastAPI's request handler
(its exit stacks, the dependency solver, which parses the query string and cookies whether or
not anything asks for them, and the response checks) does nothing but call them, and cost about
35 µs of CPU a one-image request on the shared 2-core development machine (a tenth of the
request). `DirectRoute` calls them itself. The route stays in FastAPI's table, so matching, path
parameters, OpenAPI and the error table are as before; an endpoint or dependency that takes
anything else is refused at start-up rather than called wrongly. (FastAPI's own OpenTelemetry
spans of dependencies and endpoints are not made for these routes; the app turns that
telemetry off anyway, `app.NO_TELEMETRY`.)
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, MutableMapping
from typing import Any

from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute

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


Endpoint = Callable[[Request], Awaitable[Response]]
Check = Callable[[Request], Awaitable[object]]


class DirectRoute:
    """An inference route's ASGI app without FastAPI's request handler: the route's checks (its
    dependencies) and then its endpoint are awaited with the request, and the endpoint's
    response is sent. What they raise goes to the app's error table, as from FastAPI's handler."""

    __slots__ = ("checks", "endpoint")

    def __init__(self, endpoint: Endpoint, checks: Iterable[Check] = ()) -> None:
        self.endpoint = endpoint
        self.checks = tuple(checks)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request: Request = Request(scope, receive, send)
        for check in self.checks:
            await check(request)
        response = await self.endpoint(request)
        await response(scope, receive, send)


def _takes_the_request_alone(dependant: Dependant) -> bool:
    """Whether a FastAPI endpoint or dependency is a coroutine function of the `Request` and of
    nothing else: then awaiting it with the request is all that FastAPI would do."""
    parameters = (dependant.path_params, dependant.query_params, dependant.header_params,
                  dependant.cookie_params, dependant.body_params)  # fmt: skip
    others = (dependant.websocket_param_name, dependant.http_connection_param_name,
              dependant.response_param_name, dependant.background_tasks_param_name,
              dependant.security_scopes_param_name)  # fmt: skip
    return (
        inspect.iscoroutinefunction(dependant.call)
        and dependant.request_param_name is not None
        and len(inspect.signature(dependant.call).parameters) == 1
        and not any(parameters)
        and all(name is None for name in others)
    )


def direct_route(route: APIRoute) -> DirectRoute:
    """`route`'s endpoint and dependencies as a `DirectRoute`; `TypeError` unless each takes the
    request alone (and the dependencies have none of their own)."""
    checks = route.dependant.dependencies
    if not (
        _takes_the_request_alone(route.dependant)
        and all(_takes_the_request_alone(check) and not check.dependencies for check in checks)
    ):
        raise TypeError(
            f"route {route.name!r}: an inference endpoint and its dependencies must be coroutine "
            "functions of the Request alone"
        )
    return DirectRoute(route.endpoint, [check.call for check in checks if check.call is not None])


def guard_routes(routes: Iterable[BaseRoute], names: Collection[str], admission: Admission) -> None:
    """Make the routes named `names` (the inference routes) `DirectRoute`s behind an
    `AdmissionGuard`."""
    for route in routes:
        if isinstance(route, APIRoute) and route.name in names:
            route.app = AdmissionGuard(direct_route(route), admission)
