"""Fixtures for the service: artifact versions made on the spot, and real uvicorn servers.

`make_version` exports a (seeded, random-weight) FashionMnistCNN with its score head to ONNX and
writes a `calibration.json` by hand, so the tests need no calibration run. Servers run as
subprocesses (`python -m marginwatch.service`) on a free 127.0.0.1 port and are spoken to with
httpx. Test modules do not import this file at run time; they name its types (`Server`,
`VersionFactory`, `ServerFactory`) for the type checker only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from ports import free_port

from marginwatch.artifact.hashing import file_sha256
from marginwatch.artifact.schema import ONNX_FILE, RECORD_FILE, CalibrationRecord
from marginwatch.artifact.store import CURRENT_FILE
from marginwatch.models.data import FASHION_MNIST_CLASSES, Dataset
from marginwatch.service.batcher import RunBatch
from marginwatch.service.engine import Prediction

API_KEY = "test-key-0123456789"
MODEL = "fmnist"
PROJECT = Path(__file__).resolve().parents[2]


def export_graph(path: Path, seed: int = 0) -> Path:
    """A random-weight FashionMnistCNN plus its logit-margin score, as the serving ONNX graph."""
    import torch

    from marginwatch.calibration.scores import ServingGraph
    from marginwatch.models.architectures import FashionMnistCNN
    from marginwatch.models.export import export_onnx

    torch.manual_seed(seed)
    graph = ServingGraph(FashionMnistCNN()).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(graph, (1, 28, 28), path, ["logits", "score"])
    return path


def ort_outputs(onnx: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Logits and scores from ONNX Runtime run directly (one thread), the tests' reference."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(onnx), options, providers=["CPUExecutionProvider"])
    logits, scores = session.run(["logits", "score"], {"input": images})
    return logits, scores


def make_record(
    name: str, version: str, onnx: Path, threshold: float, guard_band: float
) -> CalibrationRecord:
    return CalibrationRecord.model_validate(
        {
            "model_name": name,
            "version": version,
            "model_sha256": file_sha256(onnx),
            "input_shape": [1, 28, 28],
            "class_names": list(FASHION_MNIST_CLASSES),
            "threat_model": {"norm": "linf", "eps": 0.1},
            "score_kind": "logit-margin",
            "threshold": threshold,
            "threshold_rule": "match-fraction",
            "guard_band": guard_band,
            "subset": {"dataset": "fashion-mnist-subset", "split": "test", "size": 100, "seed": 0},
            "big_set": {"dataset": "fashion-mnist-subset", "split": "test", "size": 2000},
            "attacks": [{"name": "fmn", "steps": 100, "succeeded": 90}],
            "censored": 0,
            "kendall_tau": 0.8,
            "auroc": 0.9,
            "aupr": 0.8,
            "fpr_at_95_tpr": 0.3,
            "subset_clean_accuracy": 0.9,
            "subset_robust_accuracy": 0.7,
            "big_set_clean_accuracy": 0.9,
            "robust_accuracy": {
                "method": "regression", "estimate": 0.71, "ci_low": 0.68, "ci_high": 0.74
            },
            "robust_accuracy_estimates": [
                {"method": "count", "estimate": 0.7, "ci_low": 0.66, "ci_high": 0.74}
            ],
            "precision_not_brittle": 0.95,
            "live_curve": {
                "knots_x": [0.0, threshold, 2 * threshold + 1e-3],
                "knots_y": [0.1, 0.5, 0.9],
            },
            "created_at": "2025-11-25T12:00:00+00:00",
            "duration_s": 1.0,
        }
    )  # fmt: skip


def point_current(store: Path, name: str, version: str) -> None:
    """Switch CURRENT the way the store does: write a temporary file, then rename it."""
    temporary = store / name / f".{CURRENT_FILE}.tmp"
    temporary.write_text(version + "\n")
    temporary.replace(store / name / CURRENT_FILE)


def make_version(
    store: Path,
    name: str,
    version: str,
    *,
    onnx: Path | None = None,
    images: np.ndarray | None = None,
    threshold: float | None = None,
    guard_band: float = 1e-5,
    publish: bool = True,
) -> Path:
    """A complete version folder (copying `onnx` if given, else exporting seed 0); λ defaults to
    the median score of `images`, so about half of them are brittle."""
    folder = store / name / version
    folder.mkdir(parents=True)
    target = folder / ONNX_FILE
    if onnx is None:
        export_graph(target)
    else:
        shutil.copyfile(onnx, target)
    if threshold is None:
        if images is None:
            raise ValueError("pass images or a threshold")
        threshold = float(np.median(ort_outputs(target, images)[1]))
    record = make_record(name, version, target, threshold, guard_band)
    (folder / RECORD_FILE).write_text(record.model_dump_json(indent=2))
    if publish:
        point_current(store, name, version)
    return folder


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def stop(self, timeout_s: float = 20.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout_s)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def run_server(store: Path, log_dir: Path, **settings: str) -> Iterator[Server]:
    """`python -m marginwatch.service` on a free port with MARGINWATCH_* settings; stopped
    with SIGTERM."""
    port = free_port()
    env = {
        **os.environ,
        "MARGINWATCH_STORE": str(store),
        "MARGINWATCH_PORT": str(port),
        "MARGINWATCH_INTRA_OP_THREADS": "1",
        "MARGINWATCH_INTER_OP_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        **{f"MARGINWATCH_{key.upper()}": value for key, value in settings.items()},
    }
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"server-{port}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "marginwatch.service"],
            cwd=PROJECT,
            env=env,
            stdout=sink,
            stderr=sink,
        )
    server = Server(f"http://127.0.0.1:{port}", process, log)
    try:
        _wait_until_live(server)
        yield server
    finally:
        if server.process.poll() is None:
            server.stop()


def _wait_until_live(server: Server, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited early:\n{server.log_text()}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{server.url}/v2/health/live", timeout=1).status_code == 200:
                return
        time.sleep(0.05)
    raise RuntimeError(f"server not live after {timeout_s} s:\n{server.log_text()}")


@pytest.fixture(scope="session")
def images(fashion_subset: Dataset) -> np.ndarray:
    return fashion_subset.float_images[:256]


@pytest.fixture(scope="session")
def onnx_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ONNX graph every test version copies (exported once per session)."""
    return export_graph(tmp_path_factory.mktemp("graph") / ONNX_FILE)


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory, onnx_path: Path, images: np.ndarray) -> Path:
    root = tmp_path_factory.mktemp("store")
    make_version(root, MODEL, "v1", onnx=onnx_path, images=images, guard_band=1e-4)
    (root / "pending").mkdir()  # configured, but never published: not ready
    return root


@pytest.fixture(scope="session")
def server(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The main server: models fmnist (ready) and pending (never ready), API keys on."""
    with run_server(
        store,
        tmp_path_factory.mktemp("logs"),
        models=f"{MODEL},pending",
        api_keys=API_KEY,
        max_body_bytes=str(1 << 20),
        reload_interval_s="0",
    ) as running:
        yield running


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"X-API-Key": API_KEY}, timeout=20) as http:
        yield http


@pytest.fixture(scope="session")
def reference(onnx_path: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return ort_outputs(onnx_path, images)


@pytest.fixture(scope="session")
def record(store: Path) -> CalibrationRecord:
    return CalibrationRecord.model_validate_json((store / MODEL / "v1" / RECORD_FILE).read_bytes())


VersionFactory = Callable[..., Path]  # make_version
ServerFactory = Callable[..., AbstractContextManager[Server]]  # run_server


@pytest.fixture(scope="session")
def new_version() -> VersionFactory:
    """`make_version` as a fixture, for test modules (they do not import conftest)."""
    return make_version


@pytest.fixture(scope="session")
def spawn_server() -> ServerFactory:
    """`run_server` as a fixture."""
    return run_server


def echo(x: np.ndarray) -> Prediction:
    """A toy model with exact outputs: the score of a sample is its first value."""
    scores = x.reshape(len(x), -1)[:, 0].copy()
    return Prediction.without_answers(
        logits=x.reshape(len(x), -1),
        scores=scores,
        labels=np.zeros(len(x), dtype=np.int64),
        brittle=scores < 0.5,
        borderline=np.zeros(len(x), dtype=bool),
    )


@pytest.fixture(scope="session")
def toy_model() -> RunBatch:
    """`echo`: a batch runner whose outputs are known exactly (score = first value, brittle
    below 0.5)."""
    return echo
