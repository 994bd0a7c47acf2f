"""Traffic sampling through a real server: what it serves is what the shards hold, the folder
alone samples at the default rate, rate 0 writes nothing (and says so at start-up), and a folder
that cannot be written or whose day is full never costs a request (the drops are counted on
/metrics). The sampler in process: retention, the queue bound, shutdown."""

from __future__ import annotations

import os
import signal
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import numpy as np
import orjson
import pytest
from pydantic import ValidationError

from marginwatch.artifact.traffic import (
    TrafficShard,
    day_folder,
    list_shards,
    read_shard,
    write_shard,
)
from marginwatch.service.engine import Prediction
from marginwatch.service.metrics import ServiceMetrics
from marginwatch.service.settings import DEFAULT_TRAFFIC_SAMPLE_RATE, Settings
from marginwatch.service.traffic_sampler import TrafficSampler, gap
from metrics_text import Samples, parse, scrape, value

if TYPE_CHECKING:
    from tests.service.conftest import ServerFactory

MODEL = "fmnist"


def predict(url: str, batch: np.ndarray) -> dict[str, object]:
    response = httpx.post(
        f"{url}/v1/models/{MODEL}/predict",
        content=orjson.dumps({"inputs": batch.tolist()}),
        headers={"Content-Type": "application/json"},
        timeout=20,
    )
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


def v2_infer(url: str, batch: np.ndarray) -> dict[str, object]:
    request = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(batch.shape),
                           "data": batch.ravel().tolist()}]}  # fmt: skip
    response = httpx.post(f"{url}/v2/models/{MODEL}/infer", json=request, timeout=20)
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


def read_all(traffic: Path) -> list[TrafficShard]:
    return [read_shard(path) for path in list_shards(traffic, MODEL)]


def test_served_traffic_is_sampled_as_served(
    store: Path, tmp_path: Path, spawn_server: ServerFactory, images: np.ndarray
) -> None:
    traffic = tmp_path / "traffic"
    sent: list[np.ndarray] = []
    labels: list[int] = []
    scores: list[float] = []
    brittle: list[bool] = []
    with spawn_server(
        store, tmp_path / "logs", models=MODEL, traffic_sample_rate="1", traffic_dir=str(traffic),
        traffic_shard_samples="8", traffic_flush_s="0.2",
    ) as server:  # fmt: skip
        for start in range(0, 30, 6):  # batches of 1 to 6 images, by both protocols
            batch = images[start : start + 1 + start // 6]
            body = predict(server.url, batch)
            assert body["calibration_version"] == "v1"
            for item in body["predictions"]:  # type: ignore[attr-defined]
                labels.append(item["label"])
                scores.append(item["score"])
                brittle.append(item["brittle"])
            sent.append(batch)
        batch = images[40:43]
        outputs = {out["name"]: out["data"] for out in v2_infer(server.url, batch)["outputs"]}  # type: ignore[index]
        labels += outputs["label"]
        scores += outputs["score"]
        brittle += outputs["brittle"]
        sent.append(batch)
        served = sum(len(batch) for batch in sent)
        deadline = time.monotonic() + 20
        while sum(map(len, read_all(traffic))) < served and time.monotonic() < deadline:
            time.sleep(0.05)  # flushed by age, without a shutdown
        samples = scrape(server.url)
        assert value(samples, "marginwatch_traffic_samples_written_total", model=MODEL) == served
        assert value(samples, "marginwatch_traffic_sample_ratio") == 1.0
        assert server.stop() in (0, -signal.SIGTERM)
    shards = read_all(traffic)
    assert len(shards) >= 2  # the shard size (8) splits them
    assert {(shard.model, shard.version) for shard in shards} == {(MODEL, "v1")}
    # one writer: shards are listed in the order it wrote them, rows in the order served
    np.testing.assert_array_equal(np.concatenate([s.inputs for s in shards]), np.concatenate(sent))
    np.testing.assert_array_equal(np.concatenate([s.labels for s in shards]), labels)
    np.testing.assert_array_equal(
        np.concatenate([s.scores for s in shards]), np.array(scores, dtype=np.float32)
    )
    np.testing.assert_array_equal(np.concatenate([s.brittle for s in shards]), brittle)
    times = np.concatenate([s.times for s in shards])
    assert np.all(np.diff(times) >= 0) and abs(times[-1] - time.time()) < 600
    # user inputs: readable by the server's user alone (the default traffic_file_mode)
    paths = list_shards(traffic, MODEL)
    assert {stat.S_IMODE(path.stat().st_mode) for path in paths} == {0o600}
    assert stat.S_IMODE(paths[0].parent.stat().st_mode) == 0o700


def test_rate_zero_writes_nothing(
    store: Path, tmp_path: Path, spawn_server: ServerFactory, images: np.ndarray
) -> None:
    traffic = tmp_path / "traffic"
    with spawn_server(
        store, tmp_path / "logs", models=MODEL, traffic_sample_rate="0", traffic_dir=str(traffic)
    ) as server:
        for start in range(0, 20, 4):
            predict(server.url, images[start : start + 4])
        samples = scrape(server.url)
        assert server.stop() in (0, -signal.SIGTERM)
    assert value(samples, "marginwatch_traffic_sample_ratio") == 0.0
    assert value(samples, "marginwatch_traffic_samples_written_total", model=MODEL) is None
    assert not traffic.exists()
    # the folder is set, so an explicit 0 is said at start-up: the check would find nothing
    (warning,) = [line for line in server.log_text().splitlines() if "WARNING" in line]
    assert "traffic sampling is off" in warning and str(traffic) in warning


def test_the_folder_alone_turns_sampling_on(
    store: Path, tmp_path: Path, spawn_server: ServerFactory, images: np.ndarray
) -> None:
    """MARGINWATCH_TRAFFIC_DIR alone samples at the default rate, 0.01: of 1,280 inputs some are
    written (none with probability 0.99 ** 1280 < 3e-6), and far from all."""
    traffic = tmp_path / "traffic"
    with spawn_server(store, tmp_path / "logs", models=MODEL, traffic_dir=str(traffic)) as server:
        for _ in range(5):
            for start in range(0, 256, 64):
                predict(server.url, images[start : start + 64])
        ratio = value(scrape(server.url), "marginwatch_traffic_sample_ratio")
        assert server.stop() in (0, -signal.SIGTERM)  # the shutdown writes what is queued
    assert ratio == DEFAULT_TRAFFIC_SAMPLE_RATE == 0.01
    shards = read_all(traffic)
    written = sum(map(len, shards))
    assert 0 < written < 200
    assert {(shard.model, shard.version) for shard in shards} == {(MODEL, "v1")}
    assert "traffic sampling is off" not in server.log_text()


def fill_day(traffic: Path, nbytes: int) -> None:
    """Bytes already in today's and tomorrow's folders (a run near midnight stays full)."""
    for seconds in (time.time(), time.time() + 86400):
        folder = day_folder(traffic, MODEL, seconds)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "other-replica.npz").write_bytes(b"\0" * nbytes)


@pytest.mark.parametrize("fault", ["not_writable", "day_full"])
def test_a_folder_that_takes_no_samples_costs_no_request(
    store: Path, tmp_path: Path, spawn_server: ServerFactory, images: np.ndarray, fault: str
) -> None:
    if fault == "not_writable":
        blocker = tmp_path / "a-file"  # its "subfolders" cannot be created, even by root
        blocker.write_text("not a folder")
        traffic, reason = blocker / "traffic", "write_error"
    else:
        traffic, reason = tmp_path / "traffic", "day_limit"
        fill_day(traffic, 1024 * 1024)
    with spawn_server(
        store, tmp_path / "logs", models=MODEL, traffic_sample_rate="1", traffic_dir=str(traffic),
        traffic_flush_s="0.1", traffic_max_bytes_per_day=str(1024 * 1024),
    ) as server:  # fmt: skip
        for start in range(0, 40, 4):
            predict(server.url, images[start : start + 4])  # asserts 200
        deadline = time.monotonic() + 20
        dropped: float | None = 0.0
        while dropped != 40 and time.monotonic() < deadline:
            time.sleep(0.05)
            samples = scrape(server.url)
            dropped = value(
                samples, "marginwatch_traffic_samples_dropped_total", model=MODEL, reason=reason
            )
        assert dropped == 40
        assert value(samples, "marginwatch_traffic_samples_written_total", model=MODEL) == 0
        assert value(samples, "marginwatch_traffic_samples_dropped_total", model=MODEL,
                     reason="queue_full") == 0  # fmt: skip
        assert httpx.get(f"{server.url}/v2/health/ready", timeout=5).status_code == 200
        assert server.stop() in (0, -signal.SIGTERM)
    log = server.log_text()
    assert log.count("Traceback") == 0
    assert 1 <= log.count("WARNING") <= 2  # at most one a minute, not one per shard
    if fault == "day_full":
        assert list_shards(traffic, MODEL) == [
            day_folder(traffic, MODEL, s) / "other-replica.npz"
            for s in (time.time(), time.time() + 86400)
        ]


def batch_of(x: np.ndarray) -> Prediction:
    scores = x.reshape(len(x), -1)[:, 0].copy()
    return Prediction.without_answers(
        logits=x.reshape(len(x), -1),
        scores=scores,
        labels=np.arange(len(x), dtype=np.int64),
        brittle=scores < 0.5,
        borderline=np.zeros(len(x), dtype=bool),
    )


def sampler(traffic: Path, metrics: ServiceMetrics, **options: float) -> TrafficSampler:
    settings: dict[str, float] = {
        "rate": 1.0, "max_bytes_per_day": 1 << 20, "retention_days": 3, "queue_samples": 64,
        "shard_samples": 1000, "flush_s": 3600.0,
    }  # fmt: skip
    return TrafficSampler(traffic, metrics, **(settings | options))  # type: ignore[arg-type]


def exposition(metrics: ServiceMetrics) -> Samples:
    return parse(metrics.exposition().decode())


def test_shutdown_writes_what_is_queued_and_retention_prunes_old_days(tmp_path: Path) -> None:
    traffic = tmp_path / "traffic"
    now = time.time()
    old = [day_folder(traffic, MODEL, now - days * 86400) for days in (4, 10)]
    kept = day_folder(traffic, MODEL, now - 2 * 86400)
    # folders of the operator's that sort below the cut-off, as an old day's would
    operators = [traffic / MODEL / name for name in ("1999-notes", "0-backup", "2000-01-01x")]
    for folder in (*old, kept, *operators):
        folder.mkdir(parents=True)
    metrics = ServiceMetrics(10, traffic_sample_rate=1.0)
    writer = sampler(traffic, metrics)
    writer.start()
    x = np.random.default_rng(0).random((5, 1, 2, 2), dtype=np.float32)
    writer.offer(MODEL, "v7", x, batch_of(x))
    writer.offer(MODEL, "v8", x[:2], batch_of(x[:2]))  # another version: another shard
    writer.stop(10)  # the shard is neither full nor old: the shutdown writes it
    shards = read_all(traffic)
    assert [(shard.version, len(shard)) for shard in shards] == [("v7", 5), ("v8", 2)] or [
        (shard.version, len(shard)) for shard in shards
    ] == [("v8", 2), ("v7", 5)]
    (v7,) = [shard for shard in shards if shard.version == "v7"]
    np.testing.assert_array_equal(v7.inputs, x)
    np.testing.assert_array_equal(v7.labels, np.arange(5))
    assert not any(folder.exists() for folder in old)
    assert kept.exists()
    assert all(folder.exists() for folder in operators)  # not day folders: not retention's
    written = exposition(metrics)
    assert value(written, "marginwatch_traffic_samples_written_total", model=MODEL) == 7


def test_a_full_queue_drops_and_counts_on_the_request_path(tmp_path: Path) -> None:
    metrics = ServiceMetrics(10, traffic_sample_rate=1.0)
    writer = sampler(tmp_path / "traffic", metrics, queue_samples=6)  # not started: nothing drains
    x = np.zeros((4, 1, 2, 2), dtype=np.float32)
    writer.offer(MODEL, "v1", x, batch_of(x))
    writer.offer(MODEL, "v1", x, batch_of(x))  # 8 > 6: dropped whole
    samples = exposition(metrics)
    assert value(samples, "marginwatch_traffic_samples_dropped_total", model=MODEL,
                 reason="queue_full") == 4  # fmt: skip
    assert not (tmp_path / "traffic").exists()


def test_sampling_keeps_the_asked_fraction(tmp_path: Path) -> None:
    """The countdown sampler is Bernoulli sampling: over 200,000 inputs in batches of 1 to 64,
    the kept fraction is the rate within 5 standard deviations, and gaps are at least 1."""
    metrics = ServiceMetrics(10, traffic_sample_rate=0.01)
    writer = sampler(tmp_path / "traffic", metrics, rate=0.01, queue_samples=1 << 30)
    writer.start()
    rng = np.random.default_rng(1)
    total = 0
    while total < 200_000:
        x = np.zeros((int(rng.integers(1, 65)), 1, 1, 1), dtype=np.float32)
        writer.offer(MODEL, "v1", x, batch_of(x))
        total += len(x)
    writer.stop(10)
    kept = value(exposition(metrics), "marginwatch_traffic_samples_written_total", model=MODEL)
    assert kept is not None and kept == sum(map(len, read_all(tmp_path / "traffic")))
    assert abs(kept - 0.01 * total) < 5 * np.sqrt(total * 0.01 * 0.99)
    assert gap(1.0) == 1 and min(gap(0.5) for _ in range(100)) >= 1


def test_half_written_shards_are_never_listed(tmp_path: Path) -> None:
    x = np.ones((3, 1, 2, 2), dtype=np.float32)
    shard = TrafficShard(MODEL, "v1", x, np.zeros(3, dtype=np.int64), np.ones(3, dtype=np.float32),
                         np.zeros(3, dtype=bool), np.full(3, time.time()))  # fmt: skip
    complete = write_shard(tmp_path, shard, seq=1)
    (complete.parent / f".{complete.name[:-4]}-2.npz.tmp").write_bytes(b"PK\x03\x04 partial")
    (complete.parent / ".hidden.npz").write_bytes(b"partial")
    assert list_shards(tmp_path, MODEL) == [complete]


def test_shutdown_writes_the_samples_still_waiting(
    store: Path, tmp_path: Path, spawn_server: ServerFactory, images: np.ndarray
) -> None:
    """Neither full nor old, the shard is written by the lifespan's shutdown (SIGTERM)."""
    traffic = tmp_path / "traffic"
    with spawn_server(
        store, tmp_path / "logs", models=MODEL, traffic_sample_rate="1", traffic_dir=str(traffic),
        traffic_flush_s="3600", traffic_shard_samples="1000",
    ) as server:  # fmt: skip
        for start in range(0, 12, 3):
            predict(server.url, images[start : start + 3])
        assert read_all(traffic) == []
        assert server.stop() in (0, -signal.SIGTERM)
    (shard,) = read_all(traffic)
    np.testing.assert_array_equal(shard.inputs, images[:12])


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"MARGINWATCH_TRAFFIC_SAMPLE_RATE": "0.1"}, "needs traffic_dir"),
        ({"MARGINWATCH_TRAFFIC_SAMPLE_RATE": "1.5", "MARGINWATCH_TRAFFIC_DIR": "t"}, "less than"),
        ({"MARGINWATCH_TRAFFIC_DIR": "s", "MARGINWATCH_STORE": "s"}, "must not be the store"),
        ({"MARGINWATCH_LIVE_WINDOW_S": "0"}, "live_window_s"),
        ({"MARGINWATCH_TRAFFIC_FILE_MODE": "0644x"}, "traffic_file_mode"),
        ({"MARGINWATCH_TRAFFIC_FILE_MODE": "0400"}, "owner must read and write"),
        ({"MARGINWATCH_TRAFFIC_FILE_MODE": "0755"}, "no one may execute"),
    ],
)
def test_bad_sampling_settings_fail_with_a_message(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], words: str
) -> None:
    for key, setting in env.items():
        monkeypatch.setenv(key, setting)
    with pytest.raises(ValidationError, match=words):
        Settings()


@pytest.mark.parametrize(("mode", "folders"), [(None, 0o700), (0o640, 0o750), (0o666, 0o777)])
def test_shards_are_private_unless_widened(tmp_path: Path, mode: int | None, folders: int) -> None:
    """Shards hold user inputs: 0600 in 0700 folders by default, whatever the umask."""
    traffic = tmp_path / "traffic"
    x = np.zeros((2, 1, 2, 2), dtype=np.float32)
    shard = TrafficShard(MODEL, "v1", x, np.zeros(2, dtype=np.int64), np.zeros(2, np.float32),
                         np.zeros(2, dtype=bool), np.full(2, time.time()))  # fmt: skip
    options = {} if mode is None else {"file_mode": mode}
    previous = os.umask(0o000)  # the most permissive umask: the modes must not come from it
    try:
        path = write_shard(traffic, shard, seq=0, **options)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == (0o600 if mode is None else mode)
    assert stat.S_IMODE(path.parent.stat().st_mode) == folders
    assert stat.S_IMODE(path.parent.parent.stat().st_mode) == folders
    assert read_shard(path).version == "v1"
