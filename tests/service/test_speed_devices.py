"""The per-request speed devices keep what the service promises, each where it lives: inference
routes first in the table (`app.splice_routes`), `{name}` and the bodies still documented
(`schemas.inference_route_docs`), no dependency without keys (`auth.auth_dependencies`), the GC and
the GIL's switch interval tuned (`runtime.py`), the inference endpoints called directly with their
key check (`middleware.DirectRoute`), a body that arrived whole marked so (`protocol.py`) and
read without a timer, one that did not still timed out (`payload.RequestReader`)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import APIRouter, Request, Response
from fastapi.routing import APIRoute
from pydantic import SecretStr
from uvicorn.server import ServerState

from marginwatch.service.admission import BODY_RECEIVED
from marginwatch.service.app import create_app
from marginwatch.service.auth import auth_dependencies
from marginwatch.service.errors import RequestTimeout
from marginwatch.service.metrics import ServiceMetrics
from marginwatch.service.middleware import AdmissionGuard, DirectRoute, direct_route
from marginwatch.service.payload import RequestReader
from marginwatch.service.protocol import timed_protocol
from marginwatch.service.registry import ModelRegistry
from marginwatch.service.settings import Settings

Message = MutableMapping[str, Any]

INFERENCE = {
    "/v1/models/{name}/predict": ["application/json", "multipart/form-data"],
    "/v2/models/{name}/infer": ["application/json", "application/octet-stream"],
}


def test_inference_routes_come_first_and_declare_no_parameters(tmp_path: Path) -> None:
    routes = create_app(Settings(store=tmp_path)).router.routes
    first = routes[: len(INFERENCE)]
    assert [route.path for route in first if isinstance(route, APIRoute)] == list(INFERENCE)
    for route in first:
        assert isinstance(route, APIRoute)
        assert not route.dependant.path_params and not route.dependant.dependencies


def test_openapi_still_documents_name_and_body(tmp_path: Path) -> None:
    paths = create_app(Settings(store=tmp_path)).openapi()["paths"]
    for path, media_types in INFERENCE.items():
        operation = paths[path]["post"]
        first = operation["parameters"][0]  # v2's binary extension header follows it
        assert (first["name"], first["in"]) == ("name", "path")
        content = operation["requestBody"]["content"]
        assert list(content) == media_types
        assert "inputs" in content[media_types[0]]["schema"]["properties"]


def test_no_authentication_dependency_without_keys() -> None:
    assert auth_dependencies([]) == []
    assert len(auth_dependencies([SecretStr("key-number-1")])) == 1


def test_garbage_collector_tuned_once_started() -> None:
    code = (
        "import gc\n"
        "from marginwatch.service.runtime import tune_garbage_collector\n"
        "tune_garbage_collector()\n"
        "assert gc.get_threshold() == (100_000, 50, 100), gc.get_threshold()\n"
        "assert gc.get_freeze_count() > 1000, gc.get_freeze_count()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_thread_switching_tuned_once_started() -> None:
    code = (
        "import sys\n"
        "assert sys.getswitchinterval() == 0.005\n"
        "from marginwatch.service.runtime import tune_thread_switching\n"
        "tune_thread_switching()\n"
        "assert sys.getswitchinterval() == 0.0005, sys.getswitchinterval()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("keys", [[], ["key-number-1"]])
def test_inference_routes_call_their_endpoint_directly_with_its_key_check(
    tmp_path: Path, keys: list[str]
) -> None:
    settings = Settings(store=tmp_path, api_keys=keys)  # type: ignore[arg-type]
    routes = create_app(settings).router.routes[: len(INFERENCE)]
    for route in routes:
        assert isinstance(route, APIRoute) and isinstance(route.app, AdmissionGuard)
        direct = route.app.app
        assert isinstance(direct, DirectRoute)
        assert direct.endpoint is route.endpoint
        assert len(direct.checks) == len(keys)  # the key check, with keys only


async def _takes_a_name(request: Request, name: str) -> Response:
    return Response()


def _reads_the_request(request: Request) -> Response:  # not a coroutine function
    return Response()


@pytest.mark.parametrize("endpoint", [_takes_a_name, _reads_the_request])
def test_a_route_whose_endpoint_takes_more_than_the_request_is_not_called_directly(
    endpoint: Any,
) -> None:
    router = APIRouter()
    router.add_api_route("/x/{name}", endpoint, methods=["POST"])
    route = router.routes[0]
    assert isinstance(route, APIRoute)
    with pytest.raises(TypeError, match="of the Request alone"):
        direct_route(route)


class _Connection(asyncio.Transport):
    """The connection's socket side: what the protocol writes is kept."""

    def __init__(self) -> None:
        super().__init__()
        self.written = b""

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(
            name, default
        )

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_the_protocol_marks_a_body_that_arrived_whole() -> None:
    """One request whose body came with its headers, one whose body came later: only the first
    is marked when the app starts on it; both are read whole."""
    seen: list[tuple[bool, bytes]] = []

    async def app(scope: Message, receive: Any, send: Any) -> None:
        marked = bool(scope.get(BODY_RECEIVED))
        message = await receive()
        seen.append((marked, message["body"]))
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"0")]})  # fmt: skip
        await send({"type": "http.response.body", "body": b""})

    head = b"POST /x HTTP/1.1\r\nHost: test\r\nContent-Length: 4\r\n\r\n"

    async def scenario() -> bytes:
        protocol_class = timed_protocol(5.0)
        config = uvicorn.Config(app, http=protocol_class, lifespan="off", log_level="warning")
        config.load()
        protocol = protocol_class(config=config, server_state=ServerState(), app_state={})
        connection = _Connection()
        protocol.connection_made(connection)
        protocol.data_received(head + b"body")
        await asyncio.gather(*protocol.tasks)
        protocol.data_received(head)
        await asyncio.sleep(0)  # the app starts, and waits for the body
        protocol.data_received(b"late")
        await asyncio.gather(*protocol.tasks)
        protocol.connection_lost(None)
        return connection.written

    written = asyncio.run(scenario())
    assert seen == [(True, b"body"), (False, b"late")]
    assert written.count(b"HTTP/1.1 200") == 2


def _reader(tmp_path: Path, body_timeout_s: float) -> RequestReader:
    settings = Settings(store=tmp_path)
    registry = ModelRegistry(settings, ServiceMetrics(10, 60.0, 0.0, 10))
    return RequestReader(registry, None, 64, body_timeout_s=body_timeout_s)


def _request(messages: list[Message], marked: bool) -> Request:
    async def receive() -> Message:
        if messages:
            return messages.pop(0)
        await asyncio.Event().wait()  # the rest of the body never comes
        raise AssertionError("unreachable")

    scope = {"type": "http", "method": "POST", "path": "/", "headers": []}
    if marked:
        scope[BODY_RECEIVED] = True
    return Request(scope, receive)


@pytest.mark.parametrize("marked", [True, False])
def test_the_reader_reads_a_body_in_one_or_several_messages(tmp_path: Path, marked: bool) -> None:
    reader = _reader(tmp_path, body_timeout_s=10.0)
    pieces = [{"type": "http.request", "body": b"ab", "more_body": True},
              {"type": "http.request", "body": b"", "more_body": True},
              {"type": "http.request", "body": b"cd", "more_body": False}]  # fmt: skip
    for messages, body in ((pieces, b"abcd"), (pieces[2:], b"cd")):
        request = _request(list(messages), marked)
        assert asyncio.run(reader._body(request, limit=100, ticket=None)) == body


def test_a_body_not_marked_whole_still_times_out(tmp_path: Path) -> None:
    reader = _reader(tmp_path, body_timeout_s=0.05)
    request = _request([{"type": "http.request", "body": b"ab", "more_body": True}], False)
    with pytest.raises(RequestTimeout, match="2 bytes arrived"):
        asyncio.run(reader._body(request, limit=100, ticket=None))
