"""`MARGINWATCH_METRICS_PORT`: /metrics on a listener of its own, so that a NetworkPolicy can let
only the monitoring namespace reach it; the API port then has no /metrics."""

from __future__ import annotations

import signal
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import numpy as np
import pytest
from pydantic import ValidationError

from marginwatch.service.settings import Settings
from metrics_text import parse

if TYPE_CHECKING:
    from tests.service.conftest import ServerFactory


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_metrics_move_to_their_own_port(
    store: Path, tmp_path: Path, spawn_server: ServerFactory, images: np.ndarray
) -> None:
    metrics_port = unused_port()
    with spawn_server(store, tmp_path, metrics_port=str(metrics_port)) as server:
        body = {"inputs": images[:2].tolist()}
        response = httpx.post(f"{server.url}/v1/models/fmnist/predict", json=body, timeout=20)
        assert response.status_code == 200, response.text
        assert httpx.get(f"{server.url}/metrics", timeout=5).status_code == 404
        scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5)
        assert scraped.status_code == 200
        requests = {
            dict(labels)["endpoint"]: v
            for (name, labels), v in parse(scraped.text).items()
            if name == "marginwatch_requests_total" and dict(labels)["model"] == "fmnist"
        }
        assert requests == {"v1_predict": 1.0}
        assert server.stop() in (0, -signal.SIGTERM)
    with pytest.raises(httpx.TransportError):  # the listener went with the process
        httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2)


def test_a_separate_metrics_port_takes_no_api_keys() -> None:
    with pytest.raises(ValidationError, match="protect_metrics needs /metrics on the API port"):
        Settings(metrics_port=9090, protect_metrics=True, api_keys=["k" * 16])
    with pytest.raises(ValidationError, match="metrics_port \\(8000\\) is already"):
        Settings(metrics_port=8000)
