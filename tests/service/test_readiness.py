"""Readiness that tells the truth and refused versions that are tried again, against real store
folders and real servers (conftest.py's fixtures); /metrics read with prometheus_client's parser.
Also: a secret setting never reaches the start-up error message."""

from __future__ import annotations

import functools
import shutil
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from pydantic import ValidationError

from marginwatch.artifact.schema import ONNX_FILE
from marginwatch.artifact.store import CURRENT_FILE
from marginwatch.service.__main__ import main
from marginwatch.service.registry import retry_delay_s
from marginwatch.service.settings import Settings
from metrics_text import scrape, value

if TYPE_CHECKING:
    from conftest import Server, ServerFactory, VersionFactory

MODEL = "fmnist"
# Polled often, so the tests are quick; the backoff is an hour, so a refused version is tried
# again only because its files changed (the backoff test sets its own).
POLL = {"reload_interval_s": "0.05", "reload_retry_min_s": "3600", "reload_retry_max_s": "3600"}
NOT_UTF8 = b"\xff\xfev1\n"

Publish = Callable[..., Path]  # publish(model, version, publish=True): a good version
Serve = Callable[..., AbstractContextManager["Server"]]  # serve(**settings)


@pytest.fixture
def fresh_store(tmp_path: Path, onnx_path: Path, new_version: VersionFactory) -> Path:
    """This test's own store, where `fmnist` serves v1."""
    new_version(tmp_path / "store", MODEL, "v1", onnx=onnx_path, threshold=0.0)
    return tmp_path / "store"


@pytest.fixture
def publish(fresh_store: Path, onnx_path: Path, new_version: VersionFactory) -> Publish:
    return functools.partial(new_version, fresh_store, onnx=onnx_path, threshold=0.0)


@pytest.fixture
def serve(fresh_store: Path, tmp_path: Path, spawn_server: ServerFactory) -> Serve:
    """A server on `fresh_store` that polls every 50 ms (settings given override `POLL`)."""
    return lambda **settings: spawn_server(fresh_store, tmp_path, **{**POLL, **settings})


def point(store: Path, model: str, content: bytes) -> None:
    """Write CURRENT as the store does (a temporary file renamed over it), so that no poll reads
    it half written; the model's folder is made if need be."""
    temporary = store / model / f".{CURRENT_FILE}.tmp"
    temporary.parent.mkdir(parents=True, exist_ok=True)
    temporary.write_bytes(content)
    temporary.replace(store / model / CURRENT_FILE)


def reloads(server: Server, model: str, result: str = "failure") -> float | None:
    """`marginwatch_reloads_total{model, result}`, or None when the series does not exist."""
    return value(scrape(server.url), "marginwatch_reloads_total", model=model, result=result)


def status(server: Server, path: str) -> int:
    return httpx.get(server.url + path).status_code


def served(server: Server, model: str) -> str | None:
    """The version answering for `model` (from its metadata), or None when it has none."""
    response = httpx.get(f"{server.url}/v2/models/{model}")
    return response.json()["versions"][0] if response.status_code == 200 else None


def eventually(condition: Callable[[], bool], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def versions(server: Server, model: str) -> dict[str, str]:
    """`marginwatch_model_version_info` of `model`: {state: version}."""
    return {
        dict(labels)["state"]: dict(labels)["version"]
        for name, labels in scrape(server.url)
        if name == "marginwatch_model_version_info" and dict(labels)["model"] == model
    }


def ready_gauge(server: Server) -> dict[str, float]:
    return {
        dict(labels)["model"]: number
        for (name, labels), number in scrape(server.url).items()
        if name == "marginwatch_model_ready"
    }


def test_a_bad_new_folder_leaves_the_replica_ready_and_is_forgotten_once_removed(
    fresh_store: Path, serve: Serve
) -> None:
    with serve() as server:
        point(fresh_store, "new", b"v1\n")  # a version that does not exist
        eventually(lambda: reloads(server, "new") == 1)
        assert status(server, "/v2/health/ready") == 200
        assert status(server, "/v2/models/new/ready") == 503
        assert status(server, f"/v2/models/{MODEL}/ready") == 200
        assert ready_gauge(server) == {MODEL: 1.0, "new": 0.0}
        shutil.rmtree(fresh_store / "new")
        eventually(lambda: status(server, "/v2/models/new/ready") == 404)
        assert status(server, "/v2/health/ready") == 200
        assert not any(dict(labels).get("model") == "new" for _, labels in scrape(server.url))
        assert ready_gauge(server) == {MODEL: 1.0}


@pytest.mark.parametrize("how", ["emptied", "removed"])
def test_a_store_that_comes_back_empty_keeps_what_is_served(
    fresh_store: Path, serve: Serve, how: str
) -> None:
    """A volume remounted empty (or gone) is not every model deleted: what is loaded keeps
    serving, and the store's state is on /metrics (and in the log) until it lists models."""
    with serve() as server:
        assert value(scrape(server.url), "marginwatch_store_available") == 1
        aside = fresh_store.parent / "aside"
        if how == "emptied":
            aside.mkdir()
            (fresh_store / MODEL).rename(aside / MODEL)  # the store folder stays, empty
        else:
            fresh_store.rename(aside)
        eventually(lambda: value(scrape(server.url), "marginwatch_store_available") == 0)
        time.sleep(0.3)  # several polls: none of them may drop the model
        assert served(server, MODEL) == "v1"
        assert status(server, f"/v2/models/{MODEL}/ready") == 200
        assert status(server, "/v2/health/ready") == 200
        if how == "emptied":
            (aside / MODEL).rename(fresh_store / MODEL)
        else:
            aside.rename(fresh_store)
        eventually(lambda: value(scrape(server.url), "marginwatch_store_available") == 1)
        assert served(server, MODEL) == "v1"
        log = server.log_text()
    problem = "lists no model" if how == "emptied" else "is missing"
    assert log.count(problem) == 1  # once per change, not once per poll
    assert "lists models again" in log


def test_configured_models_decide_readiness_and_a_missing_version_is_loaded_once_it_appears(
    fresh_store: Path, publish: Publish, serve: Serve
) -> None:
    point(fresh_store, "late", b"v1\n")  # CURRENT written before its version
    point(fresh_store, "other", b"v1\n")  # in the store, but not configured: ignored
    with serve(models=f"{MODEL},late") as server:
        response = httpx.get(f"{server.url}/v2/health/ready")
        assert response.status_code == 503
        assert "late" in response.json()["error"]
        assert "other" not in response.json()["error"]
        publish("late", "v1", publish=False)
        eventually(lambda: served(server, "late") == "v1")
        assert status(server, "/v2/health/ready") == 200
        assert status(server, "/v2/models/other/ready") == 404
        assert ready_gauge(server) == {MODEL: 1.0, "late": 1.0}


def test_a_refused_version_is_tried_again_once_its_files_are_fixed(
    fresh_store: Path, onnx_path: Path, publish: Publish, serve: Serve
) -> None:
    """The fix rewrites model.onnx in place: its folder's own mtime does not change."""
    with serve() as server:
        v2 = publish(MODEL, "v2", publish=False)
        (v2 / ONNX_FILE).write_bytes(onnx_path.read_bytes() + b"\0")  # not the hashed graph
        point(fresh_store, MODEL, b"v2\n")
        eventually(lambda: reloads(server, MODEL) == 1)
        assert served(server, MODEL) == "v1"
        (v2 / ONNX_FILE).write_bytes(onnx_path.read_bytes())
        eventually(lambda: served(server, MODEL) == "v2")
        assert reloads(server, MODEL, "success") == 2


def test_reload_counters_start_at_zero_and_desired_and_served_versions_are_exported(
    fresh_store: Path, publish: Publish, serve: Serve
) -> None:
    with serve() as server:
        assert reloads(server, MODEL) == 0  # before any failure: increase() sees the first one
        assert versions(server, MODEL) == {"desired": "v1", "served": "v1"}
        point(fresh_store, MODEL, b"v2\n")  # no such folder
        eventually(lambda: reloads(server, MODEL) == 1)
        assert versions(server, MODEL) == {"desired": "v2", "served": "v1"}
        publish("late", "v1")
        eventually(lambda: reloads(server, "late", "success") == 1)
        assert reloads(server, "late") == 0
        assert versions(server, "late") == {"desired": "v1", "served": "v1"}


def test_a_refused_version_is_tried_again_when_current_is_written_again(
    fresh_store: Path, serve: Serve
) -> None:
    """Rewriting CURRENT, even with the same name, asks for a new try (the folder is unchanged,
    so it is refused again, and counted)."""
    with serve() as server:
        point(fresh_store, MODEL, b"v2\n")  # no such folder
        eventually(lambda: reloads(server, MODEL) == 1)
        point(fresh_store, MODEL, b"v2\n")
        eventually(lambda: reloads(server, MODEL) == 2)
        assert served(server, MODEL) == "v1"


def test_a_refused_version_is_retried_with_backoff(fresh_store: Path, serve: Serve) -> None:
    with serve(reload_retry_min_s="0.05", reload_retry_max_s="0.1") as server:
        point(fresh_store, MODEL, b"v2\n")  # no such folder, and nothing changes
        eventually(lambda: (reloads(server, MODEL) or 0) >= 3)
        assert served(server, MODEL) == "v1"
        assert status(server, "/v2/health/ready") == 200
        assert "refused fmnist version v2 (still serving v1)" in server.log_text()


def test_retry_delay_doubles_from_its_first_value_up_to_its_bound() -> None:
    delays = [retry_delay_s(attempt, first_s=5.0, most_s=300.0) for attempt in range(1, 10)]
    assert delays == [5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 300.0, 300.0, 300.0]
    assert retry_delay_s(10_000, first_s=5.0, most_s=300.0) == 300.0  # no float overflow


def test_a_current_that_is_not_utf8_at_start_up_is_a_refused_version(
    fresh_store: Path, publish: Publish, serve: Serve
) -> None:
    """`aaa` sorts before the good model: it must stop neither start-up nor its neighbours."""
    point(fresh_store, "aaa", NOT_UTF8)
    with serve() as server:
        assert status(server, "/v2/health/ready") == 200
        assert status(server, "/v2/models/aaa/ready") == 503
        assert reloads(server, "aaa") == 1
        publish("aaa", "v1")  # CURRENT rewritten
        eventually(lambda: served(server, "aaa") == "v1")
        assert "Traceback" not in server.log_text()


def test_a_current_that_is_not_utf8_while_running_stops_no_other_reload(
    fresh_store: Path, publish: Publish, serve: Serve
) -> None:
    publish("aaa", "v1")
    with serve() as server:
        point(fresh_store, "aaa", NOT_UTF8)
        eventually(lambda: reloads(server, "aaa") == 1)
        publish(MODEL, "v2")
        eventually(lambda: served(server, MODEL) == "v2")
        assert served(server, "aaa") == "v1"  # the refusal keeps the old version serving
        assert versions(server, "aaa") == {"served": "v1"}  # CURRENT names nothing readable
        assert reloads(server, "aaa") == 1  # once, not once per poll
        log = server.log_text()
        assert "Traceback" not in log
        assert "refused aaa CURRENT pointer (still serving v1)" in log


@pytest.mark.parametrize("source", ["environment", "flag"])
def test_a_short_api_key_is_named_by_position_never_printed(
    source: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = "a-long-enough-secret,tiny-k"
    if source == "environment":
        monkeypatch.setenv("MARGINWATCH_API_KEYS", keys)
        assert main([]) == 2
    else:
        assert main(["--api-keys", keys]) == 2
    error = capsys.readouterr().err
    for secret in ("a-long-enough-secret", "tiny-k", "tiny"):
        assert secret not in error
    # named as it was given: the variable, or the flag
    assert ("MARGINWATCH_API_KEYS" if source == "environment" else "--api-keys") in error
    assert "entry 2 of 2" in error


def test_a_settings_error_never_holds_a_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whoever prints the exception itself (an ASGI server's traceback) prints no key."""
    monkeypatch.setenv("MARGINWATCH_API_KEYS", "a-long-enough-secret,tiny-k")
    with pytest.raises(ValidationError) as caught:
        Settings()
    assert "tiny-k" not in str(caught.value)
    assert "a-long-enough-secret" not in str(caught.value)


def test_the_retry_bounds_are_ordered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MARGINWATCH_RELOAD_RETRY_MIN_S", "60")
    monkeypatch.setenv("MARGINWATCH_RELOAD_RETRY_MAX_S", "5")
    with pytest.raises(ValidationError, match="must not exceed reload_retry_max_s"):
        Settings()
