"""Hot reload under concurrent load: zero failed requests, bad versions refused, old one kept."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import numpy as np
import orjson
from prometheus_client.parser import text_string_to_metric_families

from marginwatch.artifact.schema import ONNX_FILE, RECORD_FILE

if TYPE_CHECKING:
    from conftest import ServerFactory, VersionFactory

MODEL = "fmnist"
JSON_TYPE = {"Content-Type": "application/json"}


class Load:
    """Threads that each send requests back to back and record (status, version) in order."""

    def __init__(self, url: str, images: np.ndarray, threads: int = 4) -> None:
        self.url = url
        self.images = images
        self.stop = threading.Event()
        self.seen: list[list[tuple[int, str]]] = [[] for _ in range(threads)]
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)

    def _run(self, index: int) -> None:
        rng = np.random.default_rng(index)
        with httpx.Client(base_url=self.url, timeout=20) as client:
            while not self.stop.is_set():
                batch = self.images[rng.integers(0, len(self.images), 1 + index)]
                if index % 2:
                    response = client.post(
                        f"/v1/models/{MODEL}/predict",
                        content=orjson.dumps({"inputs": batch.tolist()}),
                        headers=JSON_TYPE,
                    )
                    version = response.json().get("calibration_version", "?")
                else:
                    tensor = {"name": "input", "shape": list(batch.shape), "datatype": "FP32"}
                    body = {"inputs": [{**tensor, "data": batch.ravel().tolist()}]}
                    response = client.post(f"/v2/models/{MODEL}/infer", json=body)
                    version = response.json().get("model_version", "?")
                self.seen[index].append((response.status_code, version))

    def versions(self) -> set[str]:
        return {version for thread in self.seen for _, version in thread}


def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def samples(url: str, name: str) -> dict[tuple[str, ...], float]:
    """The values of the sample `name` on the server's /metrics, by their label values."""
    text = httpx.get(f"{url}/metrics").text
    return {
        tuple(sample.labels.values()): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


def reload_counts(url: str) -> dict[tuple[str, ...], float]:
    return samples(url, "marginwatch_reloads_total")  # by (model, result)


def test_hot_reload_under_load(
    tmp_path: Path,
    onnx_path: Path,
    images: np.ndarray,
    new_version: VersionFactory,
    spawn_server: ServerFactory,
) -> None:
    store = tmp_path / "store"
    new_version(store, MODEL, "v1", onnx=onnx_path, images=images)
    # an hour of backoff: a refused version is tried again only when its files change, so the
    # failure count below grows by one per bad version
    retry = {"reload_retry_min_s": "3600", "reload_retry_max_s": "3600"}
    with (
        spawn_server(
            store, tmp_path, reload_interval_s="0.1", max_batch_wait_s="0.005", **retry
        ) as server,
        Load(server.url, images[:64]) as load,
    ):
        wait_for(lambda: sum(map(len, load.seen)) > 20)
        new_version(store, MODEL, "v2", onnx=onnx_path, threshold=0.0)
        wait_for(lambda: all(thread and thread[-1][1] == "v2" for thread in load.seen))
        # A version whose model.onnx is not the one its record's hash names.
        bad_hash = new_version(store, MODEL, "v3", onnx=onnx_path, threshold=0.0, publish=False)
        (bad_hash / ONNX_FILE).write_bytes((bad_hash / ONNX_FILE).read_bytes() + b"\0")
        _point(store, "v3")
        wait_for(lambda: reload_counts(server.url).get((MODEL, "failure")) == 1)
        # A version whose record does not match the schema.
        bad_schema = new_version(store, MODEL, "v4", onnx=onnx_path, threshold=0.0, publish=False)
        record = orjson.loads((bad_schema / RECORD_FILE).read_bytes())
        (bad_schema / RECORD_FILE).write_bytes(orjson.dumps({**record, "threshold": "high"}))
        _point(store, "v4")
        wait_for(lambda: reload_counts(server.url).get((MODEL, "failure")) == 2)
        # A version whose hash matches but whose ONNX file is not a graph.
        unloadable = tmp_path / "garbage.onnx"
        unloadable.write_bytes(b"not an onnx graph")
        new_version(store, MODEL, "v5", onnx=unloadable, threshold=0.0)
        wait_for(lambda: reload_counts(server.url).get((MODEL, "failure")) == 3)
        # A model published after start-up is picked up (no MARGINWATCH_MODELS set).
        new_version(store, "late", "v1", onnx=onnx_path, threshold=0.0)
        wait_for(lambda: httpx.get(f"{server.url}/v2/models/late/ready").status_code == 200)
        time.sleep(0.3)
        assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200
    failures = [entry for thread in load.seen for entry in thread if entry[0] != 200]
    assert failures == []
    assert load.versions() == {"v1", "v2"}
    for thread in load.seen:  # each thread's requests are sequential: never back to v1
        versions = [version for _, version in thread]
        assert versions == sorted(versions)
    log = server.log_text()
    for version in ("v3", "v4", "v5"):
        assert f"refused {MODEL} version {version} (still serving v2)" in log


def _point(store: Path, version: str) -> None:
    temporary = store / MODEL / ".CURRENT.tmp"
    temporary.write_text(version + "\n")
    temporary.replace(store / MODEL / "CURRENT")


def test_graceful_shutdown_finishes_requests_in_flight(
    tmp_path: Path, onnx_path: Path, new_version: VersionFactory, spawn_server: ServerFactory
) -> None:
    """SIGTERM while requests wait in a slow batch: they are answered, then the process ends."""
    store = tmp_path / "store"
    new_version(store, MODEL, "v1", onnx=onnx_path, threshold=0.0)
    batch = np.full((1, 1, 1, 28, 28), 0.5).tolist()
    # the requests' deadline must outlast the batch's wait to fill
    slow_batch = {"max_batch_wait_s": "1", "request_timeout_s": "10", "reload_interval_s": "0"}
    with spawn_server(store, tmp_path, **slow_batch) as server:
        results: list[int] = []

        def send() -> None:
            response = httpx.post(
                f"{server.url}/v1/models/{MODEL}/predict",
                content=orjson.dumps({"inputs": batch[0]}),
                headers=JSON_TYPE,
                timeout=20,
            )
            results.append(response.status_code)

        senders = [threading.Thread(target=send) for _ in range(3)]
        for sender in senders:
            sender.start()
        # all three wait in one batch (it waits up to 1 s to fill) when the signal comes
        wait_for(lambda: samples(server.url, "marginwatch_queued_samples").get((MODEL,)) == 3)
        # uvicorn re-raises the signal it caught once shutdown is complete
        assert server.stop() in (0, -signal.SIGTERM)
        for sender in senders:
            sender.join(10)
        assert results == [200, 200, 200]
        assert "Application shutdown complete" in server.log_text()
