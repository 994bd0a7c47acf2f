"""The served version's traffic-check.json as metrics: it may appear after the version was
loaded (the poll notices it without reloading the model), changes are followed, and a broken one
or one of another version is logged, counted and shown as no check, while serving goes on."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np

from marginwatch.artifact.traffic import TRAFFIC_CHECK_FILE, TrafficCheck
from metrics_text import Samples, scrape, value

if TYPE_CHECKING:
    from tests.service.conftest import ServerFactory, VersionFactory

MODEL = "fmnist"


def check_document(version: str, *, recall: float | None, nonrobust: float) -> dict[str, Any]:
    def ratio(value: float) -> dict[str, Any]:
        return {"value": value, "ci_low": max(0.0, value - 0.05), "ci_high": value + 0.05,
                "count": int(value * 400), "total": 400}  # fmt: skip

    return {
        "model_name": MODEL, "version": version, "created_at": "2026-12-02T03:00:00+00:00",
        "traffic_since": 1.0e9, "traffic_until": 1.0e9 + 86400, "available_points": 900,
        "seed": 0, "threat_model": {"norm": "linf", "eps": 0.1},
        "attacks": [{"name": "fmn", "steps": 100, "succeeded": 120}], "censored": 0,
        "nonrobust": ratio(nonrobust), "flagged": ratio(0.3), "recall": recall,
        "precision": 0.75, "false_positive_rate": 0.1, "kendall_tau": 0.6, "auroc": 0.9,
        "live_gauge": 0.6, "ratios_agree": abs(nonrobust - 0.3) <= 0.1, "duration_s": 12.0,
    }  # fmt: skip


def check_json(document: dict[str, Any]) -> bytes:
    """The document as the job writes it: validated by the shared record first."""
    return TrafficCheck.model_validate(document).model_dump_json().encode()


def publish(folder: Path, content: bytes) -> None:
    """As the calibration job does: a temporary file renamed into place."""
    temporary = folder / f".{TRAFFIC_CHECK_FILE}.tmp"
    temporary.write_bytes(content)
    temporary.replace(folder / TRAFFIC_CHECK_FILE)


def check_series(samples: Samples) -> dict[str, float]:
    """The traffic-check series, keyed by name and the labels besides model and version."""
    found = {}
    for (name, labels), number in samples.items():
        if name.startswith("marginwatch_traffic_check_") and "_errors_" not in name:
            rest = ",".join(f"{k}={v}" for k, v in sorted(labels) if k not in ("model", "version"))
            assert dict(labels)["model"] == MODEL and dict(labels)["version"] == "v1"
            found[f"{name.removeprefix('marginwatch_traffic_check_')}{{{rest}}}"] = number
    return found


def wait_for(url: str, condition: Any, timeout_s: float = 20) -> Samples:
    deadline = time.monotonic() + timeout_s
    while True:
        samples = scrape(url)
        if condition(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def test_traffic_check_metrics_follow_the_file(
    tmp_path: Path,
    new_version: VersionFactory,
    spawn_server: ServerFactory,
    onnx_path: Path,
    images: np.ndarray,
) -> None:
    store = tmp_path / "store"
    folder = new_version(store, MODEL, "v1", onnx=onnx_path, images=images)

    def errors(samples: Samples) -> float | None:
        return value(samples, "marginwatch_traffic_check_errors_total", model=MODEL)

    with spawn_server(store, tmp_path / "logs", reload_interval_s="0.1") as server:
        before = scrape(server.url)
        assert check_series(before) == {} and errors(before) == 0
        publish(folder, check_json(check_document("v1", recall=0.62, nonrobust=0.45)))
        shown = check_series(wait_for(server.url, check_series))
        assert shown == {
            "nonrobust_ratio{bound=estimate}": 0.45, "nonrobust_ratio{bound=low}": 0.4,
            "nonrobust_ratio{bound=high}": 0.5, "flagged_ratio{bound=estimate}": 0.3,
            "flagged_ratio{bound=low}": 0.25, "flagged_ratio{bound=high}": 0.35,
            "recall{}": 0.62, "precision{}": 0.75, "points{kind=checked}": 400,
            "points{kind=nonrobust}": 180, "points{kind=flagged}": 120,
            "timestamp_seconds{}": 1796180400.0,
        }  # fmt: skip

        # a new check without recall (no non-robust point): the recall series goes
        publish(folder, check_json(check_document("v1", recall=None, nonrobust=0.0)))
        shown = check_series(wait_for(server.url, lambda s: "recall{}" not in check_series(s)))
        assert "recall{}" not in shown and shown["nonrobust_ratio{bound=estimate}"] == 0.0

        # broken, then a valid check of another version: ignored, counted, no series
        for count, content in enumerate(
            (b'{"model_name": "fmnist", "version": "v1"',
             check_json(check_document("v2", recall=0.9, nonrobust=0.3))), start=1,
        ):  # fmt: skip
            publish(folder, content)
            samples = wait_for(server.url, lambda s, n=count: errors(s) == n)
            assert errors(samples) == count and check_series(samples) == {}
            response = httpx.post(
                f"{server.url}/v1/models/{MODEL}/predict",
                json={"inputs": images[:2].tolist()}, timeout=10,
            )  # fmt: skip
            assert response.status_code == 200
        reloads = value(samples, "marginwatch_reloads_total", model=MODEL, result="success")
        assert reloads == 1  # the model was never reloaded for its check
        assert server.stop() in (0, -signal.SIGTERM)
    log = server.log_text()
    assert log.count(f"ignored {folder / TRAFFIC_CHECK_FILE}") == 2
    assert "checks 'fmnist' version 'v2', not 'fmnist' version 'v1'" in log
