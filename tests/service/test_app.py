"""`create_app` without a server: the import without torch, and the one error table as the
source of every status code (handlers, OpenAPI, the request metrics)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from marginwatch.service.app import STATUS_OF, create_app
from marginwatch.service.errors import ServiceError
from marginwatch.service.settings import Settings


def test_every_domain_error_has_a_status() -> None:
    assert set(ServiceError.__subclasses__()) <= set(STATUS_OF)
    assert STATUS_OF[Exception] == 500


def test_openapi_documents_the_tables_statuses(tmp_path: Path) -> None:
    paths = create_app(Settings(store=tmp_path)).openapi()["paths"]
    statuses = {str(status) for status in STATUS_OF.values()}
    documented = [
        ("/v1/models/{name}/predict", "post"),
        ("/v2/models/{name}/infer", "post"),
        ("/v2/health/ready", "get"),
    ]
    for path, method in documented:
        responses = paths[path][method]["responses"]
        assert statuses <= set(responses), path
        assert responses["503"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorResponse"
        }


def test_an_unhandled_error_is_a_generic_500_counted_as_5xx(tmp_path: Path) -> None:
    app = create_app(Settings(store=tmp_path))

    async def explode() -> None:
        raise RuntimeError("secret internal detail")

    app.add_api_route("/explode", explode, name="explode")

    async def scenario() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get("/explode")

    response = asyncio.run(scenario())
    assert response.status_code == 500
    assert response.json() == {"error": "internal server error"}
    text = app.state.metrics.exposition().decode()
    counted = {
        sample.labels["status_class"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "marginwatch_requests_total" and sample.labels["endpoint"] == "explode"
    }
    assert counted == {"5xx": 1.0}
