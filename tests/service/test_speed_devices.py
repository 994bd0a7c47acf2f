"""The per-request speed devices keep what the service promises, each where it lives: inference
routes first in the table (`app.splice_routes`), `{name}` and the bodies still documented
(`schemas.inference_route_docs`), no dependency without keys (`auth.auth_dependencies`), the GC and
the GIL's switch interval tuned (`runtime.py`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fastapi.routing import APIRoute
from pydantic import SecretStr

from marginwatch.service.app import create_app
from marginwatch.service.auth import auth_dependencies
from marginwatch.service.settings import Settings

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
