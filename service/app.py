"""`create_app(settings) -> FastAPI`: every part of the service, wired explicitly.

The route table, the one table from domain exceptions to HTTP status codes, the lifespan (load
models and start batchers and the reload watcher; on shutdown stop the watcher and let the
batchers finish what is queued), and the middleware that counts requests. Uvicorn itself stops
accepting connections on SIGTERM and waits for requests in flight before the lifespan ends.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager

import orjson
from fastapi import APIRouter, Depends, FastAPI, Request, Response, params
from fastapi.exceptions import RequestValidationError

from marginwatch.service.auth import api_key_check
from marginwatch.service.errors import (
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    PayloadTooLarge,
    ServiceError,
    Unauthorized,
    UnsupportedMediaType,
)
from marginwatch.service.metrics import CONTENT_TYPE, RequestMetricsMiddleware, ServiceMetrics
from marginwatch.service.payload import JSON
from marginwatch.service.registry import ModelRegistry
from marginwatch.service.routes_v1 import build_v1_router
from marginwatch.service.routes_v2 import SERVER_VERSION, build_health_router, build_v2_router
from marginwatch.service.settings import Settings

logger = logging.getLogger("marginwatch.service")

STATUS_OF: dict[type[ServiceError], int] = {
    InvalidInput: 400,
    Unauthorized: 401,
    ModelNotFound: 404,
    PayloadTooLarge: 413,
    UnsupportedMediaType: 415,
    ModelNotReady: 503,
    Overloaded: 503,
}
EXTRA_HEADERS: dict[type[ServiceError], dict[str, str]] = {
    Unauthorized: {"WWW-Authenticate": "Bearer"},
    Overloaded: {"Retry-After": "1"},
}

Handler = Callable[[Request, Exception], Awaitable[Response]]


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps({"error": message}), status, headers, media_type=JSON)


def _handler(status: int, headers: dict[str, str] | None) -> Handler:
    async def handle(_: Request, error: Exception) -> Response:
        return _error(status, str(error), headers)

    return handle


async def _invalid_request(_: Request, error: Exception) -> Response:
    problems = error.errors() if isinstance(error, RequestValidationError) else []
    text = "; ".join(f"{'.'.join(map(str, p['loc']))}: {p['msg']}" for p in problems)
    return _error(400, f"invalid request: {text or error}")


async def _internal_error(request: Request, error: Exception) -> Response:
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=error)
    return _error(500, "internal server error")


def _metrics_router(metrics: ServiceMetrics, dependencies: Sequence[params.Depends]) -> APIRouter:
    router = APIRouter(tags=["metrics"], dependencies=dependencies)

    @router.get("/metrics", response_class=Response, summary="Prometheus exposition")
    async def metrics_exposition() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    return router


def create_app(settings: Settings | None = None) -> FastAPI:
    """The service as an ASGI app; nothing is loaded until its lifespan starts."""
    settings = settings if settings is not None else Settings()
    metrics = ServiceMetrics(settings.live_window_predictions)
    registry = ModelRegistry(settings, metrics)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await registry.start()
        logger.info("started: models %s from %s (ready: %s)", registry.names(), settings.store,
                    registry.ready())  # fmt: skip
        try:
            yield
        finally:
            logger.info("shutting down: finishing queued requests")
            await registry.stop()

    app = FastAPI(
        title="marginwatch",
        version=SERVER_VERSION,
        description="Classifier serving with a per-request brittleness flag.",
        lifespan=lifespan,
    )
    # No dependency at all without keys: FastAPI's dependency solving costs time per request.
    guarded = [Depends(api_key_check(settings.api_keys))] if settings.api_keys else []
    routers = [
        build_v1_router(registry, settings, guarded),
        build_v2_router(registry, settings, guarded),
        build_health_router(registry, guarded if settings.protect_health else []),
        _metrics_router(metrics, guarded if settings.protect_metrics else []),
    ]
    # The routes go straight into the app's route list, inference first, instead of through
    # `include_router`: FastAPI 0.165 keeps included routers nested and matching a request
    # through them cost about 13 µs (docs/benchmarks.md). Each router already carries its
    # dependencies, tags and responses on its routes.
    app.router.routes[:0] = [route for router in routers for route in router.routes]
    for error_type, status in STATUS_OF.items():
        app.add_exception_handler(error_type, _handler(status, EXTRA_HEADERS.get(error_type)))
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(Exception, _internal_error)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics, known=registry.known)
    app.state.registry = registry
    app.state.metrics = metrics
    return app
