"""The traffic loop end to end, as it runs in production: a real server samples what it serves;
clean test images and images pushed just past a decision boundary are sent to it;
`marginwatch-calibrate --traffic` checks the served flag on the sampled folder; the server picks
the check up at its next poll and exports it; and the real alert rules, fed the exported series,
fire exactly when the check's own figures say they should (promtool)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import numpy as np
import orjson
import pytest
import torch
import yaml

from marginwatch.artifact import store
from marginwatch.artifact.schema import RECORD_FILE
from marginwatch.artifact.traffic import TRAFFIC_CHECK_FILE, TrafficCheck, iter_samples
from marginwatch.calibration.__main__ import main as calibrate
from marginwatch.calibration.boundary_points import first_flip
from marginwatch.models.data import Dataset
from marginwatch.models.registry import load_model
from metrics_text import Samples, scrape, value

if TYPE_CHECKING:
    from tests.service.conftest import ServerFactory

MODEL = "fmnist-cnn-pgd"
RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "rules.yml"
CHECK_ALERTS = ("MarginwatchTrafficCheckRecallLow", "MarginwatchTrafficCheckDisagrees")
RECALL_FLOOR, MIN_NONROBUST = 0.8, 20  # the recall alert's floor and its guard, as in rules.yml
FAST = ["--attack", "fmn:15", "--attack", "fab:5", "--bootstrap", "50", "--quiet"]


def boundary_images(images: np.ndarray, labels: np.ndarray, eps: float) -> np.ndarray:
    """Correctly classified `images` pushed by ℓ∞ steps of ε/50 until their label first flips:
    inputs a tiny perturbation flips back, which the flag must catch."""
    model = load_model(MODEL).eval()
    inputs, targets = torch.from_numpy(images), torch.from_numpy(labels)
    with torch.no_grad():
        correct = model(inputs).argmax(1) == targets
    pushed, flipped = first_flip(
        model, inputs[correct], targets[correct], norm=float("inf"), step=eps / 50, max_steps=150
    )
    return pushed[flipped].detach().numpy()


def predict(url: str, images: np.ndarray) -> list[dict[str, object]]:
    """The v1 predictions of `images`, sent 16 to a request."""
    predictions: list[dict[str, object]] = []
    for start in range(0, len(images), 16):
        response = httpx.post(
            f"{url}/v1/models/{MODEL}/predict",
            content=orjson.dumps({"inputs": images[start : start + 16].tolist()}),
            headers={"Content-Type": "application/json"},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        predictions += response.json()["predictions"]
    return predictions


def wait_for(condition_name: str, probe: object, timeout_s: float = 30.0) -> None:
    assert callable(probe)
    deadline = time.monotonic() + timeout_s
    while not probe():
        assert time.monotonic() < deadline, f"timed out waiting for {condition_name}"
        time.sleep(0.1)


def alert_test(samples: Samples, check: TrafficCheck) -> dict[str, object]:
    """A promtool test: the exported traffic-check series of two replicas as input, and the
    alerts the check's own figures call for as the expectation."""
    series = [
        {
            "series": "{}{{{}}}".format(
                name, ",".join(f'{k}="{v}"' for k, v in [*sorted(labels), *extra])
            ),
            "values": f"{number!r}x30",
        }
        for (name, labels), number in samples.items()
        if name.startswith("marginwatch_traffic_check_")
        for extra in ([("instance", "10.0.0.1:8000")], [("instance", "10.0.0.2:8000")])
    ]
    points = value(
        samples,
        "marginwatch_traffic_check_points",
        kind="nonrobust",
        model=MODEL,
        version=check.version,
    )
    assert points is not None and check.nonrobust.count == int(points)
    recall_low = (
        check.recall is not None
        and check.recall < RECALL_FLOOR
        and check.nonrobust.count >= MIN_NONROBUST
    )
    expected = {
        "MarginwatchTrafficCheckRecallLow": recall_low,
        "MarginwatchTrafficCheckDisagrees": not check.ratios_agree,
    }
    labels = {"severity": "warning", "model": MODEL, "version": check.version}
    return {
        "interval": "1m",
        "input_series": series,
        "alert_rule_test": [
            {
                "eval_time": "15m",
                "alertname": name,
                "exp_alerts": [{"exp_labels": labels}] if fires else [],
            }
            for name, fires in expected.items()
        ],
    }


def check_rules(folder: Path) -> Path:
    """The two traffic-check alerts of rules.yml as they are, less their annotations (which a
    promtool expectation would have to repeat word for word)."""
    rules = yaml.safe_load(RULES.read_text())
    kept = [
        {key: value for key, value in rule.items() if key != "annotations"}
        for group in rules["groups"]
        for rule in group["rules"]
        if rule.get("alert") in CHECK_ALERTS
    ]
    assert {rule["alert"] for rule in kept} == set(CHECK_ALERTS)
    path = folder / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "traffic-check", "rules": kept}]}))
    return path


@pytest.mark.slow
def test_sampled_traffic_is_checked_exported_and_alerted_on(
    tmp_path: Path, spawn_server: ServerFactory, fashion_subset: Dataset, promtool: str
) -> None:
    store_dir, traffic = tmp_path / "store", tmp_path / "traffic"
    shutil.copytree(store.default_store() / MODEL, store_dir / MODEL)
    version_dir = store.current_dir(store_dir, MODEL)
    record = store.read_record(version_dir)
    calibration_bytes = (version_dir / RECORD_FILE).read_bytes()

    images = fashion_subset.images.astype(np.float32) / 255.0
    clean = images[:48]
    boundary = boundary_images(
        images[48:128], fashion_subset.labels[48:128], record.threat_model.eps
    )
    assert len(boundary) >= 20, "too few flips to check the flag on"

    settings = {
        "traffic_sample_rate": "1",
        "traffic_dir": str(traffic),
        "traffic_flush_s": "0.2",
        "reload_interval_s": "0.2",
    }
    with spawn_server(store_dir, tmp_path / "logs", **settings) as server:
        served = predict(server.url, clean)
        served_boundary = predict(server.url, boundary)
        total = len(clean) + len(boundary)
        wait_for(
            "every served input in the shards",
            lambda: sum(len(shard) for _, shard in iter_samples(traffic, MODEL)) == total,
        )

        args = [
            "--store",
            str(store_dir),
            "--traffic",
            str(traffic),
            "--since",
            "1h",
            "--traffic-size",
            str(total),
            *FAST,
        ]
        assert calibrate(args) == 0

        check = TrafficCheck.model_validate_json((version_dir / TRAFFIC_CHECK_FILE).read_bytes())
        assert store.current_version(store_dir, MODEL) == record.version  # nothing served moved
        assert (version_dir / RECORD_FILE).read_bytes() == calibration_bytes
        assert check.version == record.version and check.available_points == total
        assert check.flagged.total == total
        served_brittle = sum(bool(p["brittle"]) for p in [*served, *served_boundary])
        assert check.flagged.count == served_brittle
        # every boundary input flips back within a step of ε/50: non-robust at ε
        assert check.nonrobust.count >= len(boundary)
        assert check.recall is not None

        def exported() -> bool:
            return (
                value(
                    scrape(server.url),
                    "marginwatch_traffic_check_timestamp_seconds",
                    model=MODEL,
                    version=check.version,
                )
                is not None
            )

        wait_for("the check on /metrics", exported)
        samples = scrape(server.url)

    key = {"model": MODEL, "version": check.version}
    assert value(samples, "marginwatch_traffic_check_recall", **key) == pytest.approx(check.recall)
    for name, ratio in (("nonrobust", check.nonrobust), ("flagged", check.flagged)):
        for bound, expected in (
            ("estimate", ratio.value),
            ("low", ratio.ci_low),
            ("high", ratio.ci_high),
        ):
            assert value(
                samples, f"marginwatch_traffic_check_{name}_ratio", bound=bound, **key
            ) == pytest.approx(expected)

    test_file = tmp_path / "alerts.yml"
    test_file.write_text(
        yaml.safe_dump(
            {
                "rule_files": [str(check_rules(tmp_path))],
                "evaluation_interval": "1m",
                "tests": [alert_test(samples, check)],
            }
        )
    )
    result = subprocess.run(
        [promtool, "test", "rules", str(test_file)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr

    # the served flag on inputs just past the boundary (bench/boundary_recall.py measures it at
    # length, on more kinds of boundary points)
    boundary_brittle = np.mean([p["brittle"] for p in served_boundary])
    assert boundary_brittle >= 0.95, f"the served flag caught {boundary_brittle:.0%}"
