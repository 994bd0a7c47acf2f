"""The one request reader of both inference APIs, and the checks it is made of.

`RequestReader.read` takes an inference request from the path to one validated float32 batch:
the model's deployment, the Content-Type, the body's size limit (from Content-Length, and again
while streaming) and total time limit, admission (`admission.py`: body bytes charged as they
arrive, a place taken before it is parsed; a request whose client leaves, or whose deadline
passes, while it waits for its place or its decoding gives them back at once), the protocol's
own decoding (a `BodyFormat`: orjson plus the pydantic model, the binary tensor extension, or
image files: `images.py`) and the batch checks (shape, size, NaN/Inf, range). Every problem
raises a domain error whose message names it; nothing here computes a prediction.

A model's body limit is its largest legal request in the body's encoding: `max_inputs` samples
of its input shape, at `JSON_BYTES_PER_VALUE` or, for the binary tensor extension, 4 bytes a
value; for a route that also takes image files (v1), `max_image_request_bytes` of files in a
multipart form, or as base64 in JSON (a JSON body may hold floats or images, so its limit is the
larger of the two); plus `ENVELOPE_BYTES` for the rest of the body (`body_limit`,
`image_body_limit`). Bodies above `PARSE_OFF_LOOP_BYTES` are decoded in the reader's own thread,
so the event loop goes on answering meanwhile; image files are decoded there whatever their size.
The parsing and the batch checks themselves are `decoding.py`'s.

Five per-request speed devices are the reader's (measured in process with
`bench/asgi_overhead.py` and `bench/request_profile.py`, or under load with
`bench/serve_load.py`; docs/benchmarks.md):
- **`{name}` read from the path parameters by hand** (`model_name`), not declared as an endpoint
  argument: FastAPI's parameter validation cost about 9 µs a request (6 % of the service's own
  time per one-image request), for a string the registry checks anyway. OpenAPI would lose the
  parameter, so `schemas.inference_route_docs` documents it by hand.
- **Bodies read and parsed here**, not declared as a FastAPI body parameter: the size limit
  applies while streaming, the binary tensor extension is not JSON, and numbers become one numpy
  array in one call. `schemas.request_body` documents the schema FastAPI no longer sees.
- **No parsed body held across the await**: `read` returns only the float32 batch, so the body
  and its parsed lists die before the request waits for its batch. 64 requests in flight kept 64
  parsed 784-float lists alive, out of the caches; concurrency 32 went from 4,934 to 6,177 req/s.
- **A body that arrived whole is read without a timer**, its ASGI messages directly (`_body`):
  `protocol.py` marks a request whose body the server already holds (nearly every one), and
  only a body still arriving gets the total time-out's timer (10–20 µs of CPU a request).
- **Headers looked up in one `RequestHeaders`**, whose `get` raises no `KeyError` for a header
  not sent (about 4 µs a request).
"""

from __future__ import annotations

import asyncio
import math
import time
from asyncio import FIRST_COMPLETED
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

import numpy as np
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect, Request

from marginwatch.service.admission import BODY_RECEIVED, Ticket, ticket_of
from marginwatch.service.decoding import check_batch
from marginwatch.service.deployment import Deployment
from marginwatch.service.errors import (
    InvalidInput,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
)
from marginwatch.service.images import (
    RESIZE,
    EncodedImages,
    ImageLimits,
    decode_images,
    resize_option,
)
from marginwatch.service.registry import ModelRegistry

T = TypeVar("T")
OptionsT = TypeVar("OptionsT")
JSON = "application/json"
OCTET_STREAM = "application/octet-stream"
FORM = "multipart/form-data"
# The longest shortest-round-trip float64 in JSON ("-1.1754943508222875e-38", 23 characters) and
# its ", " separator: what orjson, json.dumps and numpy's tolist() write for any float32.
JSON_BYTES_PER_VALUE = 25
BINARY_BYTES_PER_VALUE = 4  # FP32, the one input datatype
ENVELOPE_BYTES = 64 * 1024  # field names, options, whitespace, a binary request's JSON header
# A form part's own bytes beside its data: boundary line, Content-Disposition with a file name,
# Content-Type (about 150 bytes with a 60-character file name)
FORM_PART_BYTES = 1024
# Above this a body is decoded off the event loop. A 64 KiB JSON body takes about 1 ms to parse
# on the 2-core development machine, four times the thread hop (docs/benchmarks.md).
PARSE_OFF_LOOP_BYTES = 64 * 1024
# The image encoding a body may carry, known from its Content-Type before it is read
ImageBody = Literal["form", "json"] | None


@dataclass(frozen=True)
class BodyFormat(Generic[OptionsT]):
    """One protocol's request body: the media types it comes in, and `decode(body, headers)`,
    which returns the input array (not yet checked), or image files not yet decoded, and the
    request's options."""

    media_types: tuple[str, ...]
    decode: Callable[[bytes, Headers], tuple[np.ndarray | EncodedImages, OptionsT]]
    what: str = "inputs"  # how error messages name the input
    # the header that marks a body as binary tensor data (4 bytes a value, not JSON's 25)
    binary_header: str | None = None
    # whether bodies may carry image files: as a multipart form, or as base64 in JSON
    images: bool = False


def body_limit(input_shape: Sequence[int], max_inputs: int, *, binary: bool) -> int:
    """The size of the largest legal request body for a model: `max_inputs` samples of
    `input_shape`, as JSON numbers or as binary FP32, plus `ENVELOPE_BYTES`."""
    per_value = BINARY_BYTES_PER_VALUE if binary else JSON_BYTES_PER_VALUE
    return max_inputs * math.prod(input_shape) * per_value + ENVELOPE_BYTES


def image_body_limit(limits: ImageLimits, max_inputs: int, *, form: bool) -> int:
    """The size of the largest legal body of image files: `limits.max_request_bytes` of files in
    a multipart form (with the part headers of `max_inputs` files and two flags) or as base64
    in JSON, plus `ENVELOPE_BYTES`."""
    files = limits.max_request_bytes
    if form:
        return files + (max_inputs + 2) * FORM_PART_BYTES + ENVELOPE_BYTES
    return 4 * math.ceil(files / 3) + ENVELOPE_BYTES


def model_name(request: Request) -> str:
    """The `{name}` of an inference route's path, unvalidated: the registry checks it (read by
    hand, see the module's docstring)."""
    name: str = request.path_params["name"]
    return name


class RequestHeaders(Headers):
    """Starlette's `Headers`, with a `get` that finds a header missing without raising and
    catching a `KeyError` (the `Mapping` default's way): the reader looks up headers a request
    seldom sends, and made once per request for all its look-ups (about 4 µs a request)."""

    def get(self, key: str, default: Any = None) -> Any:
        wanted = key.lower().encode("latin-1")
        for name, value in self._list:
            if name == wanted:
                return value.decode("latin-1")
        return default


def is_form(headers: Headers) -> bool:
    return headers.get("content-type", "").lower().startswith(FORM)


def _one_parser() -> ThreadPoolExecutor:
    # One thread: orjson and numpy's list conversion hold the GIL while they run, so more threads
    # would not parse faster, and one bounds the memory of parses in flight (a JSON body's lists
    # take several times its size).
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="parse")


@dataclass(frozen=True)
class RequestReader:
    """Reads an inference request; one per app, shared by the v1 and v2 routes (and, through
    `admit` and `check`, the gRPC adapter)."""

    registry: ModelRegistry
    max_body_bytes: int | None  # a cap below the models' own limits, if set
    max_inputs: int
    parser: ThreadPoolExecutor = field(default_factory=_one_parser)
    images: ImageLimits = field(default_factory=ImageLimits)
    body_timeout_s: float = 10.0  # the whole body must arrive within this (a setting)

    async def read(
        self, request: Request, body_format: BodyFormat[OptionsT]
    ) -> tuple[Deployment, np.ndarray, OptionsT]:
        """The deployment that serves the request's model, its validated float32 batch and
        its options. Only the batch comes back: the body and what was parsed from it are freed
        before the caller waits for its batch (see the module's docstring)."""
        name = model_name(request)
        # an unknown or unready model is refused before the body is read
        deployment = self.registry.get(name)
        headers = RequestHeaders(scope=request.scope)
        check_content_type(headers, body_format.media_types)
        ticket = ticket_of(request.scope)
        limit = self._admit_body(headers, deployment, body_format, ticket)
        body = await self._body(request, limit, ticket)
        if ticket is not None and not ticket.take_free_place():
            await abandonable(request, ticket, ticket.take_place())
        # looked up again: a reload may have swapped the version while the body streamed in, and
        # the batch must fit the version that will serve it
        deployment = self.registry.get(name)
        if len(body) <= PARSE_OFF_LOOP_BYTES:
            x, options = self._decode(deployment, body_format, body, headers)
        else:
            decoded = asyncio.get_running_loop().run_in_executor(
                self.parser, self._decode, deployment, body_format, body, headers
            )
            x, options = await abandonable(request, ticket, decoded)
        if isinstance(x, EncodedImages):
            del body  # the files are in `x`
            resize = resize_option(x.resize, request.query_params.get(RESIZE))
            pixels = asyncio.get_running_loop().run_in_executor(
                self.parser, self._decode_images, deployment, x, resize
            )
            x = await abandonable(request, ticket, pixels)
        return deployment, x, options

    async def _body(self, request: Request, limit: int, ticket: Ticket | None) -> bytes:
        """The whole body, its bytes charged to the body budget as they arrive (a client that
        declares a large body and trickles it holds only what it sent), within `body_timeout_s`
        in all (a client that sends a byte just before each read time-out holds no request
        forever). A body the HTTP server already holds whole (`BODY_RECEIVED`) cannot keep the
        reader waiting, so it is read with no timer (a speed device: the timer cost 10–20 µs of
        CPU a request on the shared 2-core development machine)."""
        chunks: list[bytes] = []
        try:
            if request.scope.get(BODY_RECEIVED):
                await _receive_body(request, chunks, limit, ticket)
            else:
                async with asyncio.timeout(self.body_timeout_s):
                    await _receive_body(request, chunks, limit, ticket)
        except TimeoutError:
            raise RequestTimeout(
                f"the body took longer than {self.body_timeout_s:g} s to arrive "
                f"(body_total_timeout_s); {sum(map(len, chunks))} bytes arrived"
            ) from None
        if len(chunks) == 1:
            return chunks[0]
        body = b"".join(chunks)
        if not body:
            raise InvalidInput("the request body is empty")
        return body

    def _admit_body(
        self,
        headers: Headers,
        deployment: Deployment,
        body_format: BodyFormat[Any],
        ticket: Ticket | None,
    ) -> int:
        """The body's size limit, once the declared length is known to fit it and the model's
        queue to have room: before a byte of the body is read."""
        marker = body_format.binary_header
        binary = marker is not None and marker in headers
        images: ImageBody = None
        if body_format.images and not binary:
            images = "form" if is_form(headers) else "json"
        declared = headers.get("content-length")
        size = int(declared) if declared is not None and declared.isdigit() else None
        return self.admit(deployment, size, binary=binary, ticket=ticket, images=images)

    def admit(
        self,
        deployment: Deployment,
        size: int | None,
        *,
        binary: bool,
        ticket: Ticket | None,
        images: ImageBody = None,
    ) -> int:
        """The size limit of a request to `deployment`, once its `size` (None: not declared) is
        known to fit it, its model's queue has room and the body budget could ever hold it. Both
        transports call it: HTTP with the Content-Length before reading the body (whose bytes
        are charged as they arrive), gRPC with the size of the message it got (which it then
        charges whole)."""
        limit = self._limit(deployment, binary, images)
        if self.max_body_bytes is not None:
            limit = min(limit, self.max_body_bytes)
        if size is not None and size > limit:
            raise PayloadTooLarge(
                f"the body has {size} bytes, above "
                f"{self._explain(deployment, limit, binary, images)}"
            )
        if ticket is not None:
            deployment.batcher.check_room()
            if size is not None:
                ticket.check_size(size)
        return limit

    def _limit(self, deployment: Deployment, binary: bool, images: ImageBody) -> int:
        if images == "form":
            return image_body_limit(self.images, self.max_inputs, form=True)
        floats = body_limit(deployment.model.record.input_shape, self.max_inputs, binary=binary)
        if images == "json":
            return max(floats, image_body_limit(self.images, self.max_inputs, form=False))
        return floats

    def _explain(self, deployment: Deployment, limit: int, binary: bool, images: ImageBody) -> str:
        """The body limit in words, for a 413's message (written only then: it costs µs)."""
        if limit == self.max_body_bytes:
            return f"the limit of {limit} bytes (max_body_bytes)"
        files = f"{self.images.max_request_bytes} bytes of image files (max_image_request_bytes)"
        if images == "form":
            return f"the limit of {limit} bytes for image requests ({files} in a multipart form)"
        shape = list(deployment.model.record.input_shape)
        encoding = "binary FP32" if binary else "JSON"
        floats = f"{self.max_inputs} inputs of shape {shape} as {encoding}"
        if images == "json" and limit > body_limit(shape, self.max_inputs, binary=False):
            return (
                f"the limit of {limit} bytes for model {deployment.model.name!r} ({files} as "
                f"base64 in JSON, more than {floats} take)"
            )
        return f"the limit of {limit} bytes for model {deployment.model.name!r} ({floats})"

    def _decode(
        self,
        deployment: Deployment,
        body_format: BodyFormat[OptionsT],
        body: bytes,
        headers: Headers,
    ) -> tuple[np.ndarray | EncodedImages, OptionsT]:
        """The checked batch of a body of numbers; the files of a body of images, as they are
        (`_decode_images` decodes them, always in the parse thread)."""
        x, options = body_format.decode(body, headers)
        if isinstance(x, EncodedImages):
            return x, options
        return self.check(deployment, x, body_format.what), options

    def _decode_images(
        self, deployment: Deployment, encoded: EncodedImages, resize: bool
    ) -> np.ndarray:
        record = deployment.model.record
        x = decode_images(
            encoded,
            input_shape=record.input_shape,
            input_range=record.input_range,
            resize=resize,
            limits=self.images,
            max_inputs=self.max_inputs,
        )
        return self.check(deployment, x, "images")

    def check(self, deployment: Deployment, x: np.ndarray, what: str) -> np.ndarray:
        """`check_batch` against the deployment's input shape and range and `max_inputs`: the
        batch checks of every transport (the gRPC adapter calls it too)."""
        record = deployment.model.record
        return check_batch(
            x,
            input_shape=record.input_shape,
            input_range=record.input_range,
            max_inputs=self.max_inputs,
            what=what,
        )


async def _receive_body(
    request: Request, chunks: list[bytes], limit: int, ticket: Ticket | None
) -> None:
    """The body's chunks into `chunks` until the last, each checked against `limit` (a chunked
    body declares no length) and charged to `ticket`. ASGI messages are read directly rather
    than through `Request.stream`, an async generator: about 3 µs less a request."""
    receive = request.receive
    received = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk: bytes = message.get("body", b"")
        if chunk:
            received += len(chunk)
            if received > limit:
                raise PayloadTooLarge(f"the body exceeds the limit of {limit} bytes")
            if ticket is not None:
                ticket.reserve_bytes(len(chunk))
            chunks.append(chunk)
        if not message.get("more_body", False):
            return


async def abandonable(request: Request, ticket: Ticket | None, work: Awaitable[T]) -> T:
    """`await work`, unless the client leaves (`ClientDisconnect`) or the request's deadline
    passes (`Overloaded`) first. `work` is then cancelled, so a decoding still queued for the
    parse thread never starts, and the route's guard closes the ticket at once, giving its place
    and body bytes to requests that can still be served: a request waiting behind a slow decode
    no longer holds them until its turn comes (issue 19)."""
    if ticket is None:
        return await work
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        left = max(0.0, ticket.deadline - time.monotonic())
        done, _ = await asyncio.wait((task, gone), timeout=left, return_when=FIRST_COMPLETED)
    finally:
        gone.cancel()
        task.cancel()  # a no-op once it is done
    if task in done:
        return task.result()
    if gone in done:
        raise ClientDisconnect()
    raise Overloaded(
        "the request's deadline passed while it waited for its place or its decoding; retry later",
        "deadline",
    )


async def _client_gone(request: Request) -> None:
    """Returns once the client disconnects. Called after the whole body was read: the next
    ASGI message can only be the disconnect (or nothing, until the response is sent)."""
    message = await request.receive()
    if message["type"] != "http.disconnect":
        await asyncio.Event().wait()  # never set: nothing to watch for any more


def check_content_type(headers: Headers, allowed: Sequence[str]) -> None:
    """A missing Content-Type is accepted (several OIP clients send none); a wrong one is not."""
    header = headers.get("content-type")
    if header is None:
        return
    media_type = header.split(";", 1)[0].strip().lower()
    if media_type not in allowed:
        raise UnsupportedMediaType(
            f"Content-Type {media_type!r} is not accepted here; send {' or '.join(allowed)}"
        )
