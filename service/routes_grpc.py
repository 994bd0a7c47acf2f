"""The Open Inference Protocol v2 over gRPC: KServe's and Triton's `inference.GRPCInferenceService`
(stubs in `oip_grpc/`), served by the process itself on a second port (`grpc_port`).

A thin adapter over the v2 route's read → infer → serialise path: only the wire differs. A
`ModelInferRequest` becomes the very `schemas.InferenceRequest` an HTTP body becomes, its
`raw_input_contents` playing the binary tensor extension's part, so the protocol's checks
(`routes_v2.input_array`, `requested_outputs`), the request reader's limits and batch checks
(`RequestReader.admit`, `RequestReader.check`), admission (`admission.py`), the deployment's
batcher, the output table (`engine.SERVED_OUTPUTS`), the API keys (`auth.py`, checked by a server
interceptor before the message is deserialized) and the request metrics are the HTTP path's
own. Errors take their gRPC code from `app.GRPC_STATUS_OF`, beside the HTTP table; the request
metrics count a call under the endpoint `grpc_<method>` with the status class of the HTTP status
its outcome has, so an error ratio reads the same on both. Memory: a failed call keeps nothing
alive once aborted (`rpc`), and a message larger than any legal request is refused by gRPC as it
arrives (`GrpcServer`).

Outputs come back in the form the inputs came in: `raw_output_contents` for a request with
`raw_input_contents` (what tritonclient sends), typed `contents` for one with typed contents.

Why `grpc.aio` on uvicorn's event loop rather than a server of its own: the batcher, admission
and the metrics' inboxes are used from the loop's thread only, so the gRPC handlers run as tasks
of that loop; the app's lifespan starts the server after the models load and stops it before
the batchers drain.

The generated modules register messages named `inference.*` in protobuf's default descriptor
pool, as tritonclient's do, and one process cannot hold both: `create_app` imports this module
only when `grpc_port` is set.
"""

from __future__ import annotations

import functools
import logging
import re
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol, TypeVar

import grpc
import numpy as np
from pydantic import SecretStr

from marginwatch.artifact.graph import INPUT_NAME
from marginwatch.service.admission import Admission
from marginwatch.service.auth import accepted_keys, presented_key, verify_key
from marginwatch.service.engine import (
    INPUT_DATATYPE,
    Prediction,
    ServedModel,
    TensorSpec,
    calibration_facts,
)
from marginwatch.service.errors import (
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    ServiceError,
    ShedReason,
    Unauthorized,
)
from marginwatch.service.metrics import ServiceMetrics
from marginwatch.service.middleware import CLIENT_CLOSED_REQUEST, UNKNOWN_MODEL
from marginwatch.service.oip_grpc import open_inference_grpc_pb2 as pb
from marginwatch.service.oip_grpc import open_inference_grpc_pb2_grpc as pb_grpc
from marginwatch.service.payload import RequestReader, validate
from marginwatch.service.registry import Deployment, ModelRegistry
from marginwatch.service.routes_v2 import (
    SERVER_NAME,
    SERVER_VERSION,
    Asked,
    input_array,
    raw_tensor,
    requested_outputs,
)
from marginwatch.service.schemas import InferenceRequest

logger = logging.getLogger("marginwatch.service")

ResponseT = TypeVar("ResponseT")
HTTP_OK = 200  # the status class a successful call counts under in the request metrics
# The `InferTensorContents` field that holds each datatype's typed values (the protocol's table;
# the outputs are written with it)
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}
HEALTH_METHODS = frozenset({"ServerLive", "ServerReady"})  # keyed only with protect_health
WHAT = f"input {INPUT_NAME!r}"  # how error messages name the input, as in the v2 route


class Context(Protocol):
    """What the handlers use of `grpc.aio.ServicerContext` (grpcio ships no type hints)."""

    async def abort(self, code: grpc.StatusCode, details: str) -> NoReturn: ...
    def time_remaining(self) -> float | None: ...


def lookup(table: Mapping[type[Exception], ResponseT], error: Exception) -> ResponseT:
    """The entry of `error`'s nearest class in `table` (as Starlette finds exception handlers);
    `table[Exception]` is the fallback."""
    for cls in type(error).__mro__:
        if cls in table:
            return table[cls]
    return table[Exception]


# --- request --------------------------------------------------------------------------------


def parameter_values(parameters: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    """A protobuf parameter map as the plain values a JSON body would carry."""
    values = {}
    for key, parameter in parameters.items():
        choice = parameter.WhichOneof("parameter_choice")
        if choice is not None:
            values[key] = getattr(parameter, choice)
    return values


def typed_values(tensor: pb.ModelInferRequest.InferInputTensor) -> np.ndarray | None:
    """A tensor's typed `contents` as a flat float32 array; None for any datatype but the one the
    models take (`input_array` then refuses the datatype, in the v2 route's words)."""
    if tensor.datatype != INPUT_DATATYPE:
        return None
    # one C-level copy: upb's repeated fields convert without a Python loop (36 µs for 32 images)
    return np.asarray(tensor.contents.fp32_contents, dtype=np.float32)


def as_inference_request(request: pb.ModelInferRequest) -> tuple[InferenceRequest, memoryview]:
    """The request as the v2 route's `InferenceRequest` and binary part: `raw_input_contents`
    become binary tensor data (each input's `binary_data_size` its entry's length), typed
    `contents` become `data`. The schema's checks (datatypes, shapes) apply as to a JSON body."""
    raw = list(request.raw_input_contents)  # reading an entry copies it out: once only
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs: send "
            "one per input, in the order of `inputs`"
        )
    inputs = []
    for index, tensor in enumerate(request.inputs):
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
            "parameters": parameter_values(tensor.parameters),
        }
        if raw:
            if tensor.HasField("contents"):
                raise InvalidInput(
                    f"input {tensor.name!r} has typed contents in a request with "
                    "raw_input_contents: send one or the other"
                )
            entry["parameters"]["binary_data_size"] = len(raw[index])
        elif tensor.HasField("contents"):
            entry["data"] = typed_values(tensor)
        else:  # said in gRPC's words (the v2 check would speak of `data` and binary_data_size)
            raise InvalidInput(
                f"input {tensor.name!r} has neither contents nor an entry in raw_input_contents"
            )
        inputs.append(entry)
    document: dict[str, Any] = {
        "id": request.id or None,
        "parameters": parameter_values(request.parameters),
        "inputs": inputs,
    }
    if request.outputs:
        document["outputs"] = [
            {"name": output.name, "parameters": parameter_values(output.parameters)}
            for output in request.outputs
        ]
    binary = memoryview(raw[0]) if len(raw) == 1 else memoryview(b"".join(raw))
    return validate(InferenceRequest, document), binary


# --- response -------------------------------------------------------------------------------


def set_parameter(parameter: pb.InferParameter, value: object) -> None:
    if isinstance(value, bool):  # before int: a bool is an int
        parameter.bool_param = value
    elif isinstance(value, int):
        parameter.int64_param = value
    elif isinstance(value, float):
        parameter.double_param = value
    else:
        parameter.string_param = str(value)


def response_header(deployment: Deployment) -> pb.ModelInferResponse:
    """What a response of this version always carries: the v2 route's header fields."""
    record = deployment.model.record
    header = pb.ModelInferResponse(model_name=deployment.model.name, model_version=record.version)
    for key, value in calibration_facts(record).items():
        set_parameter(header.parameters[key], value)
    return header


def infer_response(
    header: pb.ModelInferResponse, request_id: str, prediction: Prediction, asked: Asked, raw: bool
) -> pb.ModelInferResponse:
    """The response: `header`'s fields and the outputs, as raw bytes or typed contents."""
    response = pb.ModelInferResponse()
    response.CopyFrom(header)
    response.id = request_id
    for spec, _ in asked:  # the binary flag is HTTP's: here the request's own form decides
        array: np.ndarray = getattr(prediction, spec.field)
        tensor = response.outputs.add(name=spec.name, datatype=spec.datatype, shape=array.shape)
        if raw:
            response.raw_output_contents.append(raw_tensor(spec, array))
        else:
            getattr(tensor.contents, CONTENTS_FIELD[spec.datatype]).extend(array.ravel().tolist())
    return response


def tensor_metadata(specs: Sequence[TensorSpec]) -> list[pb.ModelMetadataResponse.TensorMetadata]:
    return [
        pb.ModelMetadataResponse.TensorMetadata(
            name=spec.name, datatype=spec.datatype, shape=spec.shape
        )
        for spec in specs
    ]


# --- the service ----------------------------------------------------------------------------

Handler = Callable[["InferenceServicer", Any, Context], Awaitable[Any]]


def rpc(endpoint: str, *, model: str | None = None) -> Callable[[Handler], Handler]:
    """An RPC's handler, run through `InferenceServicer._answer` (request metrics under
    `endpoint`, error tables); the API key was checked before the message was read
    (`KeyInterceptor`). `model` names the request field that holds the model's name.

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
            del parsed, binary  # not held across the await (fastpath.py, device 4)
            prediction = await deployment.infer(x, _deadline(ticket.deadline, context))
            raw = bool(request.raw_input_contents)
            header = self._header(deployment)
            return infer_response(header, request.id, prediction, asked, raw)
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
