"""The gRPC server of the Open Inference Protocol, as MLServer's `grpc/server.py`: `GrpcServer`, a
`grpc.aio` server for `InferenceServicer` (`grpc_servicer.py`) on a second port (`grpc_port`),
and `KeyInterceptor`, which checks a call's API key before its message is read. A message larger
than any legal request is refused by gRPC as it arrives (`GrpcServer`).

Why `grpc.aio` on uvicorn's event loop rather than a server of its own: the batcher, admission
and the metrics' inboxes are used from the loop's thread only, so the gRPC handlers run as tasks
of that loop, and gRPC calls and HTTP requests to a model share its one batcher; the app's
lifespan starts the server after the models load and stops it before the batchers drain. What
that costs: `grpc.aio` accepts one call at a time, each through its completion-queue thread and
a few loop turns, so concurrent calls reach the batcher one round trip apart and batch only
because the servicer tells the batcher to wait for them (`grpc_servicer.py`, "Batching"). An
empty call costs the process about 250 µs of CPU on a busy 2-core machine, most on the loop,
which the handlers cannot shorten; gRPC's synchronous server, its handlers hopping to the loop to
reach the batcher, cost about 320 µs, and a server on a loop of its own would run its Python
under the same lock and hop as well. Against HTTP: `bench/grpc_vs_http.py`.

The generated modules register messages named `inference.*` in protobuf's default descriptor
pool, as tritonclient's do, and one process cannot hold both: `create_app` imports this module
(and with it the servicer and the stubs) only when `grpc_port` is set.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, NoReturn

import grpc
from pydantic import SecretStr

from marginwatch.service.auth import accepted_keys, presented_key, verify_key
from marginwatch.service.errors import Unauthorized
from marginwatch.service.grpc_servicer import Context, InferenceServicer, lookup
from marginwatch.service.metrics import ServiceMetrics
from marginwatch.service.middleware import UNKNOWN_MODEL
from marginwatch.service.oip_grpc import open_inference_grpc_pb2_grpc as pb_grpc

logger = logging.getLogger("marginwatch.service")
HEALTH_METHODS = frozenset({"ServerLive", "ServerReady"})  # keyed only with protect_health


class KeyInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc is untyped
    """Checks a call's API key from its metadata alone, before its message is deserialized:
    a keyless call costs no parsing (its bytes, bounded by the message limit, are dropped
    unread). Health calls need a key only with `protect_health`, as /v2/health/* do; the rest
    whenever keys are set, as /v2 and /v2/models/* do. A refused call is counted under its
    endpoint; its model is `_unknown`, since the model's name is inside the unread message."""

    def __init__(
        self,
        api_keys: Sequence[SecretStr],
        *,
        protect_health: bool,
        metrics: ServiceMetrics,
        http_status: Mapping[type[Exception], int],
    ) -> None:
        self._keys = accepted_keys(api_keys)
        self._protect_health = protect_health
        self._metrics = metrics
        self._status = lookup(http_status, Unauthorized(""))

    async def intercept_service(
        self,
        continuation: Callable[[Any], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = str(details.method).rsplit("/", 1)[-1]
        if self._keys and (self._protect_health or method not in HEALTH_METHODS):
            headers = _call_headers(details.invocation_metadata)
            try:
                verify_key(self._keys, presented_key(headers))
            except Unauthorized as error:
                return self._refusal(method, str(error))
        return await continuation(details)

    def _refusal(self, method: str, message: str) -> grpc.RpcMethodHandler:
        endpoint = "grpc_" + re.sub(r"(?<!^)(?=[A-Z])", "_", method).lower()
        model = UNKNOWN_MODEL if method.startswith("Model") else ""

        async def refuse(request: bytes, context: Context) -> NoReturn:
            del request  # the undecoded message: not kept alive by the abort's traceback
            self._metrics.observe_request(model, endpoint, self._status, 0.0, None)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        # no request_deserializer: the message reaches `refuse` as bytes, never parsed
        return grpc.unary_unary_rpc_method_handler(refuse)


def _call_headers(metadata: Sequence[tuple[str, str | bytes]] | None) -> dict[str, str]:
    """A call's text metadata as headers (keys are lower-case in gRPC); the first of a
    repeated key wins, as Starlette's `headers.get` does."""
    headers: dict[str, str] = {}
    for key, value in metadata or ():
        if isinstance(value, str):
            headers.setdefault(key, value)
    return headers


class GrpcServer:
    """The `grpc.aio` server on the running event loop; `start()` binds, `stop()` drains.

    `max_message_bytes()` is asked once, at `start()` (after the models loaded, since a
    model's largest request depends on its input shape): gRPC refuses a larger message as it
    arrives, before it is held whole or parsed."""

    def __init__(
        self,
        servicer: InferenceServicer,
        interceptor: KeyInterceptor,
        *,
        host: str,
        port: int,
        max_message_bytes: Callable[[], int],
    ) -> None:
        self._servicer = servicer
        self._interceptor = interceptor
        self._address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._max_message_bytes = max_message_bytes
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        limit = self._max_message_bytes()
        server = grpc.aio.server(
            interceptors=[self._interceptor],
            options=[
                # gRPC shares a taken port by default (SO_REUSEPORT): fail as uvicorn does
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", limit),
            ],
        )
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(self._servicer, server)
        server.add_insecure_port(self._address)  # raises if it cannot bind: start-up fails
        await server.start()
        self._server = server
        logger.info(
            "serving the Open Inference Protocol over gRPC on %s (messages up to %d bytes)",
            self._address,
            limit,
        )

    async def stop(self, grace_s: float) -> None:
        """Refuse new calls, give those in flight `grace_s` to finish, then cancel them."""
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None
