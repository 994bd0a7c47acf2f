"""The Open Inference Protocol v2 over gRPC: `InferenceServicer`, KServe's and Triton's
`inference.GRPCInferenceService` (stubs in `oip_grpc/`), as MLServer's `grpc/servicers.py`; the
server that runs it and checks API keys is `grpc_server.py`, the message conversion
`grpc_convert.py`.

A thin adapter over the v2 route's read → infer → serialise path: only the wire differs. A
`ModelInferRequest` becomes the very `schemas.InferenceRequest` an HTTP body becomes
(`grpc_convert.as_inference_request`), so the protocol's checks (`routes_v2.input_array`,
`requested_outputs`), the request reader's limits and batch checks (`RequestReader.admit`,
`RequestReader.check`), admission (`admission.py`), the deployment's batcher, the output table
(`engine.SERVED_OUTPUTS`), the API keys (`auth.py`, checked by the server's interceptor before the
message is deserialized) and the request metrics are the HTTP path's own. Errors take their gRPC
code from `app.GRPC_STATUS_OF`, beside the HTTP table; the request metrics count a call under the
endpoint `grpc_<method>` with the status class of the HTTP status its outcome has, so an error
ratio reads the same on both. Memory: a failed call keeps nothing alive once aborted (`rpc`).

Batching: `grpc.aio` hands the event loop one new call per round trip through its completion-queue
thread, so concurrent calls never reach the batcher in the same loop turn, as concurrent HTTP
requests do; alone, the batcher's turn rule ran every call in a batch of its own (issue 21). So
`ModelInfer` tells the batcher how many calls to its model are in progress, counted from the
batcher until gRPC has sent each answer (`InferenceServicer._in_progress`): a call that finds
others in progress, or that follows a batch that had company, has its batch wait briefly for them
(`batcher.py`), and HTTP requests join the same batch.

Imported only when `grpc_port` is set, as the stubs are (`oip_grpc/__init__.py`).
"""

from __future__ import annotations

import functools
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol, TypeVar

import grpc

from marginwatch.artifact.graph import INPUT_NAME
from marginwatch.service.admission import Admission
from marginwatch.service.budgets import at_budget, budget_facts, budget_index, parameters_eps
from marginwatch.service.deployment import Deployment
from marginwatch.service.engine import ServedModel
from marginwatch.service.errors import (
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    ServiceError,
    ShedReason,
)
from marginwatch.service.grpc_convert import (
    as_inference_request,
    infer_response,
    response_header,
    set_parameter,
    tensor_metadata,
)
from marginwatch.service.metrics import ServiceMetrics
from marginwatch.service.middleware import CLIENT_CLOSED_REQUEST, UNKNOWN_MODEL
from marginwatch.service.oip_grpc import open_inference_grpc_pb2 as pb
from marginwatch.service.oip_grpc import open_inference_grpc_pb2_grpc as pb_grpc
from marginwatch.service.payload import RequestReader
from marginwatch.service.registry import ModelRegistry
from marginwatch.service.routes_v2 import (
    SERVER_NAME,
    SERVER_VERSION,
    input_array,
    requested_outputs,
)

logger = logging.getLogger("marginwatch.service")

ResponseT = TypeVar("ResponseT")
HTTP_OK = 200  # the status class a successful call counts under in the request metrics
WHAT = f"input {INPUT_NAME!r}"  # how error messages name the input, as in the v2 route


class Context(Protocol):
    """What the handlers use of `grpc.aio.ServicerContext` (grpcio ships no type hints)."""

    async def abort(self, code: grpc.StatusCode, details: str) -> NoReturn: ...
    def time_remaining(self) -> float | None: ...
    def add_done_callback(self, callback: Callable[[Any], object]) -> None: ...


def lookup(table: Mapping[type[Exception], ResponseT], error: Exception) -> ResponseT:
    """The entry of `error`'s nearest class in `table` (as Starlette finds exception handlers);
    `table[Exception]` is the fallback."""
    for cls in type(error).__mro__:
        if cls in table:
            return table[cls]
    return table[Exception]


Handler = Callable[["InferenceServicer", Any, Context], Awaitable[Any]]


def rpc(endpoint: str, *, model: str | None = None) -> Callable[[Handler], Handler]:
    """An RPC's handler, run through `InferenceServicer._answer` (request metrics under
    `endpoint`, error tables); the API key was checked before the message was read
    (`grpc_server.KeyInterceptor`). `model` names the request field that holds the model's name.

    A failed call is aborted here, once `_answer` has returned and the handler's arguments are
    gone: `context.abort` raises, and the exception's traceback holds every frame it passes
    through. Aborted inside `except`, the handled error (whose traceback holds the handler's
    frame, and so the request) was kept alive with it, in reference cycles that only the
    cyclic collector frees; a 90 MB message stayed in memory per failed call."""

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def method(self: InferenceServicer, request: Any, context: Context) -> Any:
            name = None if model is None else getattr(request, model)
            work = functools.partial(handler, self, request, context)
            del request  # from here on only `work` holds it, and `_answer` lets it go
            outcome = await self._answer(endpoint, name, work)
            if isinstance(outcome, Failure):
                await context.abort(outcome.code, outcome.details)
            return outcome

        return method

    return wrap


@dataclass(frozen=True, slots=True)
class Failure:
    """How a call failed: its gRPC code and the message the client is told."""

    code: grpc.StatusCode
    details: str


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The six RPCs, each one the v2 route's counterpart."""

    def __init__(
        self,
        *,
        registry: ModelRegistry,
        reader: RequestReader,
        admission: Admission,
        metrics: ServiceMetrics,
        http_status: Mapping[type[Exception], int],
        grpc_status: Mapping[type[Exception], str],
    ) -> None:
        self._registry = registry
        self._reader = reader
        self._admission = admission
        self._metrics = metrics
        self._http_status = http_status
        self._grpc_status = {error: grpc.StatusCode[name] for error, name in grpc_status.items()}
        self._calls: dict[str, int] = {}  # ModelInfer calls in progress, by model (_in_progress)
        self._headers: weakref.WeakKeyDictionary[ServedModel, pb.ModelInferResponse] = (
            weakref.WeakKeyDictionary()
        )

    @rpc("grpc_server_live")
    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: Context
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @rpc("grpc_server_ready")
    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: Context
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._registry.ready())

    @rpc("grpc_model_ready", model="name")
    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: Context
    ) -> pb.ModelReadyResponse:
        # the protocol says "not ready" in the response (HTTP says it with a 503); an unknown
        # model stays an error, NOT_FOUND, as its 404
        try:
            self._deployment(request.name, request.version)
        except ModelNotReady:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    @rpc("grpc_server_metadata")
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Context
    ) -> pb.ServerMetadataResponse:
        # no extension: the v2 route's one (binary tensor data) is what raw contents are here
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION)

    @rpc("grpc_model_metadata", model="name")
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Context
    ) -> pb.ModelMetadataResponse:
        meta = self._deployment(request.name, request.version).model.metadata()
        # what the v2 route gives as `parameters`; the protocol's properties are strings
        properties = {**meta.calibration, "providers": ",".join(meta.providers)}
        return pb.ModelMetadataResponse(
            name=meta.name,
            versions=[meta.version],
            platform=meta.platform,
            inputs=tensor_metadata(meta.inputs),
            outputs=tensor_metadata(meta.outputs),
            properties={key: str(value) for key, value in properties.items()},
        )

    @rpc("grpc_model_infer", model="model_name")
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: Context
    ) -> pb.ModelInferResponse:
        """The v2 route's steps: deployment, admission, decoding and checks, the batcher."""
        ticket = self._admission.open()
        try:
            name, version = request.model_name, request.model_version
            deployment = self._deployment(name, version)
            # the message has arrived whole: its size is checked and reserved, as a body's is
            size = request.ByteSize()
            self._reader.admit(deployment, size, binary=True, ticket=ticket)
            ticket.reserve_bytes(size)
            if not ticket.take_free_place():
                await ticket.take_place()
            deployment = self._deployment(name, version)  # a reload may have come meanwhile
            parsed, binary = as_inference_request(request)
            x = self._reader.check(deployment, input_array(parsed, binary), WHAT)
            asked = requested_outputs(parsed)
            model = deployment.model
            budget = budget_index(model, parameters_eps(parsed.parameters))  # 422's before a run
            del parsed, binary  # not held across the await (payload.py, "no parsed body held")
            company = self._in_progress(name, context)
            prediction = await deployment.infer(
                x, _deadline(ticket.deadline, context), company=company
            )
            raw = bool(request.raw_input_contents)
            header = self._header(deployment)
            response = infer_response(
                header, request.id, at_budget(model, prediction, budget), asked, raw
            )
            if budget != model.answers.served:  # the header states the served budget's facts
                for key, value in budget_facts(model, budget).items():
                    set_parameter(response.parameters[key], value)
            return response
        finally:
            ticket.close()

    async def _answer(
        self, endpoint: str, model: str | None, work: Callable[[], Awaitable[ResponseT]]
    ) -> ResponseT | Failure:
        """`work()`'s response, or the `Failure` to abort the call with (the caller aborts, see
        `rpc`); either way counted in the request metrics."""
        started = time.perf_counter()
        status = CLIENT_CLOSED_REQUEST  # what a call counts as if the client cancels it
        shed: ShedReason | None = None
        try:
            response: ResponseT | Failure = await work()
            status = HTTP_OK
        except Exception as error:  # only plain values leave this clause: no traceback
            status = lookup(self._http_status, error)
            shed = error.reason if isinstance(error, Overloaded) else None
            response = Failure(lookup(self._grpc_status, error), _client_message(error, endpoint))
        finally:
            del work
            label = "" if model is None else model if self._registry.known(model) else UNKNOWN_MODEL
            seconds = time.perf_counter() - started
            self._metrics.observe_request(label, endpoint, status, seconds, shed)
        return response

    def _in_progress(self, name: str, context: Context) -> int:
        """Counts this call to `name` in progress until gRPC has sent its answer (the context's
        done callback), and returns how many are, this one included. Counted to the sending's
        end, not to the handler's: calls to the loop come one round trip apart, so one that
        arrives while another's answer is still being sent is the sign that clients overlap
        (at concurrency 1 none ever does, and no call waits for company)."""
        count = self._calls[name] = self._calls.get(name, 0) + 1
        context.add_done_callback(functools.partial(self._call_done, name))
        return count

    def _call_done(self, name: str, _: object) -> None:
        left = self._calls[name] - 1
        if left:
            self._calls[name] = left
        else:
            del self._calls[name]

    def _header(self, deployment: Deployment) -> pb.ModelInferResponse:
        """`response_header`, built once per loaded version: setting its eight parameters cost
        14 µs a request, copying them 3 µs. Keyed weakly by the `ServedModel`, so a version that
        is retired takes its entry with it (and one loaded again gets a fresh one)."""
        header = self._headers.get(deployment.model)
        if header is None:
            header = self._headers[deployment.model] = response_header(deployment)
        return header

    def _deployment(self, name: str, version: str) -> Deployment:
        """The deployment serving `name`; a version, if asked for, must be the one served."""
        deployment = self._registry.get(name)
        if version and version != deployment.model.version:
            raise ModelNotFound(
                f"model {name!r} serves version {deployment.model.version}, not {version!r}"
            )
        return deployment


def _deadline(admission_deadline: float, context: Context) -> float:
    """The earlier of admission's deadline and the client's own (`time.monotonic`): a batch
    that would start after the client stopped waiting is not run."""
    remaining = context.time_remaining()
    if remaining is None:
        return admission_deadline
    return min(admission_deadline, time.monotonic() + remaining)


def _client_message(error: Exception, endpoint: str) -> str:
    """A domain error's own message; anything else is logged and told as a generic line."""
    if isinstance(error, ServiceError):
        return str(error)
    logger.error("unhandled error in %s", endpoint, exc_info=error)
    return "internal server error"
