"""`create_app(settings) -> FastAPI`: every part of the service, wired explicitly.

The route table, the one table from exceptions to HTTP status codes (every status the service
answers with, its OpenAPI error responses and the status the request metrics give an unhandled
error all come from it) and beside it the one table to gRPC status codes, the lifespan (load
models and start batchers, the reload watcher and, with `grpc_port`, the gRPC server; on shutdown
stop the gRPC server and the watcher and let the batchers finish what is queued; with
`traffic_sample_rate`, the traffic sampler's writer thread starts first and stops last, so that it
writes every sample of the drained batches), and the middleware that counts requests. Uvicorn
itself stops accepting connections on SIGTERM and waits for requests in flight before the lifespan
ends; gRPC calls go on being taken until then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING

import orjson
from fastapi import APIRouter, FastAPI, Request, Response, params
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.telemetry import TelemetryConfig

from marginwatch.service.admission import Admission
from marginwatch.service.auth import auth_dependencies
from marginwatch.service.errors import (
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    ServiceError,
    Unauthorized,
    UnknownBudget,
    UnsupportedMediaType,
)
from marginwatch.service.images import ImageLimits
from marginwatch.service.metrics import CONTENT_TYPE, ServiceMetrics
from marginwatch.service.metrics_port import MetricsPort
from marginwatch.service.middleware import SHED, RequestMetricsMiddleware, guard_routes
from marginwatch.service.payload import JSON, RequestReader
from marginwatch.service.registry import ModelRegistry
from marginwatch.service.routes_v1 import build_v1_router
from marginwatch.service.routes_v2 import SERVER_VERSION, build_health_router, build_v2_router
from marginwatch.service.runtime import collect_garbage
from marginwatch.service.schemas import error_responses
from marginwatch.service.settings import Settings
from marginwatch.service.traffic_sampler import TrafficSampler, warn_if_sampling_off

if TYPE_CHECKING:
    from marginwatch.service.grpc_server import GrpcServer

logger = logging.getLogger("marginwatch.service")

STATUS_OF: dict[type[Exception], int] = {
    InvalidInput: 400,
    RequestValidationError: 400,  # FastAPI's check of a declared path parameter
    Unauthorized: 401,
    ModelNotFound: 404,
    RequestTimeout: 408,
    PayloadTooLarge: 413,
    UnsupportedMediaType: 415,
    UnknownBudget: 422,
    ModelNotReady: 503,
    Overloaded: 503,
    Exception: 500,  # anything unhandled: logged, and answered without its text
}
# The same errors over gRPC (`grpc_servicer.py`), as names of `grpc.StatusCode` members: grpc takes
# 0.1 s to import, which only a process serving gRPC pays. Its request metrics count each call
# under the status class of the HTTP status above.
GRPC_STATUS_OF: dict[type[Exception], str] = {
    InvalidInput: "INVALID_ARGUMENT",
    UnknownBudget: "INVALID_ARGUMENT",
    Unauthorized: "UNAUTHENTICATED",
    ModelNotFound: "NOT_FOUND",
    RequestTimeout: "DEADLINE_EXCEEDED",  # HTTP's only (a gRPC message arrives whole)
    PayloadTooLarge: "RESOURCE_EXHAUSTED",  # what gRPC itself says of a message too large
    UnsupportedMediaType: "INVALID_ARGUMENT",  # HTTP's only: kept so that every error has a code
    ModelNotReady: "UNAVAILABLE",
    Overloaded: "UNAVAILABLE",
    Exception: "INTERNAL",  # logged, and answered without its text
}
EXTRA_HEADERS: dict[type[Exception], dict[str, str]] = {
    Unauthorized: {"WWW-Authenticate": "Bearer"},
    Overloaded: {"Retry-After": "1"},
    # the rest of the body is still on its way: the connection cannot carry another request
    RequestTimeout: {"Connection": "close"},
}

# FastAPI's native OpenTelemetry off: with it on, every request asks OpenTelemetry's API whether a
# tracer, meter or logger provider has been configured (about 12 µs of CPU a request on the shared
# 2-core development machine, docs/benchmarks.md), and in this service none ever is: it installs
# no OpenTelemetry SDK, and its metrics are Prometheus's.
NO_TELEMETRY: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False}
OPENAPI_URL = "/openapi.json"
GRPC_DEFAULT_MESSAGE_BYTES = 4 * 1024 * 1024  # grpc's own max_receive_message_length
# The routes whose requests go through admission control (`admission.py`)
INFERENCE_ENDPOINTS = ("v1_predict", "v2_infer")

Handler = Callable[[Request, Exception], Awaitable[Response]]


def _client_message(request: Request, error: Exception) -> str:
    """What the client is told: a domain error's own message, FastAPI's validation problems,
    and for anything else a generic line (the details go to the log only)."""
    if isinstance(error, ServiceError):
        return str(error)
    if isinstance(error, RequestValidationError):
        problems = "; ".join(
            f"{'.'.join(map(str, problem['loc']))}: {problem['msg']}" for problem in error.errors()
        )
        return f"invalid request: {problems or error}"
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=error)
    return "internal server error"


def _handler(status: int, headers: dict[str, str] | None) -> Handler:
    async def handle(request: Request, error: Exception) -> Response:
        if isinstance(error, Overloaded):  # for the request metrics (`middleware.py`)
            request.scope[SHED] = error.reason
        body = orjson.dumps({"error": _client_message(request, error)})
        return Response(body, status, headers, media_type=JSON)

    return handle


def splice_routes(app: FastAPI, routers: Sequence[APIRouter]) -> None:
    """Put the routers' routes at the front of the app's own route list, in order, rather than
    `include_router` them: a speed device (docs/benchmarks.md, "How it got here"). FastAPI 0.165
    keeps included routers nested, and matching a request through them cost about 13 µs. Each
    router lists its inference route first, since the table is matched in order, and already
    carries its tags, dependencies and error responses on its routes."""
    app.router.routes[:0] = [route for router in routers for route in router.routes]


def _metrics_router(metrics: ServiceMetrics, dependencies: Sequence[params.Depends]) -> APIRouter:
    router = APIRouter(tags=["metrics"], dependencies=dependencies)

    @router.get("/metrics", response_class=Response, summary="Prometheus exposition")
    async def metrics_exposition() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    return router


def _docs_router(app: FastAPI, dependencies: Sequence[params.Depends]) -> APIRouter:
    """/openapi.json, /docs and /redoc behind the API key (FastAPI's own, which it leaves open,
    are turned off): the schema names every route and limit, which is no business of a client
    without a key. `public_docs` opens them again."""
    router = APIRouter(dependencies=dependencies, include_in_schema=False)
    title = f"{app.title} - documentation"

    @router.get(OPENAPI_URL)
    async def openapi_schema() -> JSONResponse:
        return JSONResponse(app.openapi())

    @router.get("/docs")
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=OPENAPI_URL, title=title)

    @router.get("/redoc")
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url=OPENAPI_URL, title=title)

    return router


def _grpc_server(
    settings: Settings,
    registry: ModelRegistry,
    reader: RequestReader,
    admission: Admission,
    metrics: ServiceMetrics,
) -> GrpcServer:
    # imported only here: their generated stubs and tritonclient's register the same protobuf
    # names, and a process that imports both fails (see grpc_server.py)
    from marginwatch.service.grpc_server import GrpcServer, KeyInterceptor
    from marginwatch.service.grpc_servicer import InferenceServicer

    servicer = InferenceServicer(
        registry=registry,
        reader=reader,
        admission=admission,
        metrics=metrics,
        http_status=STATUS_OF,
        grpc_status=GRPC_STATUS_OF,
    )
    interceptor = KeyInterceptor(
        settings.api_keys,
        protect_health=settings.protect_health,
        metrics=metrics,
        http_status=STATUS_OF,
    )
    return GrpcServer(
        servicer,
        interceptor,
        host=settings.host,
        port=settings.grpc_port,
        max_message_bytes=lambda: grpc_message_limit(settings, registry, reader),
    )


def grpc_message_limit(settings: Settings, registry: ModelRegistry, reader: RequestReader) -> int:
    """The largest gRPC message taken: the largest binary request (`max_inputs_per_request`
    samples, 4 bytes a value) of the models loaded at start, but at least gRPC's own default
    (4 MiB), so that a model published later with larger inputs is not cut off by the
    transport; never more than `max_body_bytes`, if set, or the body budget. Raw and typed
    contents both take 4 bytes a value."""
    largest = GRPC_DEFAULT_MESSAGE_BYTES
    for name in registry.names():
        with contextlib.suppress(ServiceError):  # not loaded (yet): it cannot set the limit
            largest = max(largest, reader.admit(registry.get(name), None, binary=True, ticket=None))
    return min(largest, settings.max_body_bytes or largest, settings.max_inflight_body_bytes)


def _traffic_sampler(settings: Settings, metrics: ServiceMetrics) -> TrafficSampler | None:
    if settings.traffic_sample_rate == 0 or settings.traffic_dir is None:
        return None
    return TrafficSampler(
        settings.traffic_dir,
        metrics,
        rate=settings.traffic_sample_rate,
        max_bytes_per_day=settings.traffic_max_bytes_per_day,
        retention_days=settings.traffic_retention_days,
        queue_samples=settings.traffic_queue_samples,
        shard_samples=settings.traffic_shard_samples,
        flush_s=settings.traffic_flush_s,
        file_mode=settings.traffic_file_mode_bits,
    )


def _lifespan(
    settings: Settings,
    registry: ModelRegistry,
    sampler: TrafficSampler | None,
    grpc_server: GrpcServer | None,
    metrics_port: MetricsPort | None,
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """Start in order (the sampler's writer, the periodic garbage collection, the models, gRPC,
    the metrics port); stop in reverse, the batchers draining what is queued."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        warn_if_sampling_off(settings.traffic_dir, settings.traffic_sample_rate)
        if sampler is not None:
            sampler.start()
        collector = asyncio.create_task(collect_garbage(), name="collect-garbage")
        await registry.start()
        if grpc_server is not None:
            await grpc_server.start()
        if metrics_port is not None:
            metrics_port.start()
        logger.info("started: models %s from %s (ready: %s)", registry.names(), settings.store,
                    registry.ready())  # fmt: skip
        try:
            yield
        finally:
            logger.info("shutting down: finishing queued requests")
            if grpc_server is not None:  # its calls in flight finish before the batchers stop
                await grpc_server.stop(settings.shutdown_timeout_s)
            await registry.stop()
            if sampler is not None:
                sampler.stop(settings.shutdown_timeout_s)
            if metrics_port is not None:  # scraped until the end: the drain shows on it
                metrics_port.stop()
            collector.cancel()

    return lifespan


def create_app(settings: Settings | None = None) -> FastAPI:
    """The service as an ASGI app; nothing is loaded until its lifespan starts."""
    settings = settings if settings is not None else Settings()
    metrics = ServiceMetrics(
        settings.live_window_predictions,
        settings.live_window_s,
        settings.traffic_sample_rate,
        settings.class_labels,
    )
    sampler = _traffic_sampler(settings, metrics)
    admission = Admission(
        max_requests=settings.max_inflight_requests,
        max_body_bytes=settings.max_inflight_body_bytes,
        max_waiting=settings.max_waiting_requests,
        timeout_s=settings.request_timeout_s,
    )
    metrics.watch_admission(admission)
    registry = ModelRegistry(settings, metrics, sampler, backlog=lambda: admission.waiting > 0)
    images = ImageLimits(
        settings.max_image_bytes, settings.max_image_request_bytes, settings.max_image_pixels
    )
    reader = RequestReader(
        registry,
        settings.max_body_bytes,
        settings.max_inputs_per_request,
        images=images,
        body_timeout_s=settings.body_total_timeout_s,
    )
    grpc_server = (
        _grpc_server(settings, registry, reader, admission, metrics) if settings.grpc_port else None
    )

    metrics_port = (
        MetricsPort(metrics.registry, settings.host, settings.metrics_port,
                    read_timeout_s=settings.read_timeout_s)
        if settings.metrics_port
        else None
    )  # fmt: skip
    lifespan = _lifespan(settings, registry, sampler, grpc_server, metrics_port)

    guarded = auth_dependencies(settings.api_keys)
    docs_guarded = bool(guarded) and not settings.public_docs
    app = FastAPI(
        title="marginwatch",
        version=SERVER_VERSION,
        description="Classifier serving with a per-request brittleness flag.",
        lifespan=lifespan,
        # FastAPI's own documentation routes take no dependencies: behind the key, ours stand in
        openapi_url=None if docs_guarded else OPENAPI_URL,
        docs_url=None if docs_guarded else "/docs",
        redoc_url=None if docs_guarded else "/redoc",
        telemetry=NO_TELEMETRY,
    )
    errors = error_responses(STATUS_OF.values())
    routers = [
        build_v1_router(reader, dependencies=guarded, errors=errors),
        build_v2_router(registry, reader, dependencies=guarded, errors=errors),
        build_health_router(
            registry, dependencies=guarded if settings.protect_health else [], errors=errors
        ),
    ]
    if not settings.metrics_port:
        routers.append(_metrics_router(metrics, guarded if settings.protect_metrics else []))
    if docs_guarded:
        routers.append(_docs_router(app, guarded))
    splice_routes(app, routers)
    guard_routes(app.router.routes, INFERENCE_ENDPOINTS, admission)
    for error_type, status in STATUS_OF.items():
        app.add_exception_handler(error_type, _handler(status, EXTRA_HEADERS.get(error_type)))
    app.add_middleware(
        RequestMetricsMiddleware,
        metrics=metrics,
        known=registry.known,
        unhandled_status=STATUS_OF[Exception],
    )
    app.state.registry = registry
    app.state.metrics = metrics
    app.state.admission = admission
    return app
