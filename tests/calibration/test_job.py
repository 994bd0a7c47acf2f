"""The calibration job end to end, on the shipped model and test subset, with real files:
publication, parity of the served graph, bad input, and the faults the store must survive."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from marginwatch.artifact import store
from marginwatch.artifact.schema import ONNX_FILE, REPORT_FILE, CalibrationRecord
from marginwatch.calibration.__main__ import main
from marginwatch.calibration.scores import ServingGraph, logit_margin
from marginwatch.models.data import Dataset, save_npz
from marginwatch.models.export import onnx_session, run_batched
from marginwatch.models.registry import load_model

PROJECT = Path(__file__).resolve().parents[2]
# Small budgets keep each run to seconds; the figures themselves are measured in bench/.
FAST = ["--attack", "fmn:15", "--attack", "fab:5", "--bootstrap", "50", "--quiet"]


@pytest.fixture(scope="module")
def data_npz(tmp_path_factory: pytest.TempPathFactory, fashion_subset: Dataset) -> Path:
    path = tmp_path_factory.mktemp("data") / "fmnist-600.npz"
    save_npz(fashion_subset.subset(np.arange(0, 2000, 2)[:600]), path)
    return path


def calibrate(store_dir: Path, data: Path, *extra: str) -> int:
    """A run on a pinned subset (without --seed each run draws its own: the sharded runs and
    their merge must share one)."""
    return main(["--store", str(store_dir), "--dataset", str(data), "--subset-size", "60",
                 "--seed", "0", "--pseudo-margin", "never", *FAST, *extra])  # fmt: skip


@pytest.mark.slow
def test_publishes_a_verified_version(tmp_path: Path, data_npz: Path) -> None:
    assert calibrate(tmp_path, data_npz, "--version", "v1") == 0
    version_dir = store.current_dir(tmp_path, "fmnist-cnn-pgd")
    assert version_dir.name == "v1"
    record = store.read_record(version_dir)
    assert record.subset.size == 60 and record.big_set.size == 600
    assert record.threat_model.eps == 0.1 and record.threat_model.norm == "linf"
    assert record.score_kind == "logit-margin"
    assert [a.name for a in record.attacks] == ["fmn", "fab"]
    assert -1 <= record.kendall_tau <= 1 and 0 <= record.auroc <= 1
    for estimate in record.robust_accuracy_estimates:
        assert 0 <= estimate.ci_low <= estimate.estimate <= estimate.ci_high <= 1
    assert record.robust_accuracy.estimate <= record.big_set_clean_accuracy
    report = (version_dir / REPORT_FILE).read_text()
    assert report.count("data:image/png;base64,") >= 3 and "fmnist-cnn-pgd" in report


@pytest.mark.slow
def test_served_graph_matches_torch(
    tmp_path: Path, data_npz: Path, fashion_subset: Dataset
) -> None:
    assert calibrate(tmp_path, data_npz) == 0
    version_dir = store.current_dir(tmp_path, "fmnist-cnn-pgd")
    inputs = fashion_subset.float_images[:300]
    session = onnx_session(version_dir / ONNX_FILE)
    model = load_model("fmnist-cnn-pgd")
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(inputs))
    np.testing.assert_allclose(
        run_batched(session, inputs, "score", 64), logit_margin(torch_logits).numpy(), atol=1e-4
    )
    assert (
        run_batched(session, inputs, "logits", 7).argmax(1) == torch_logits.argmax(1).numpy()
    ).all()


@pytest.mark.slow
def test_pseudo_margin_path_is_recorded_and_served(tmp_path: Path, data_npz: Path) -> None:
    code = main(["--store", str(tmp_path), "--dataset", str(data_npz), "--subset-size", "60",
                 "--pseudo-margin", "always", "--pseudo-train-size", "60", "--pseudo-epochs", "30",
                 *FAST])  # fmt: skip
    assert code == 0
    record = store.read_record(store.current_dir(tmp_path, "fmnist-cnn-pgd"))
    assert record.score_kind == "pseudo-margin"
    assert record.pseudo_margin is not None and record.pseudo_margin.chosen
    assert record.pseudo_margin.train_points == 60 and record.pseudo_margin.held_out_points == 60
    # the served score is the MLP's, not the logit margin
    session = onnx_session(store.current_dir(tmp_path, "fmnist-cnn-pgd") / ONNX_FILE)
    inputs = np.random.default_rng(0).random((5, 1, 28, 28), dtype=np.float32)
    logits, score = session.run(["logits", "score"], {"input": inputs})
    assert not np.allclose(score, np.sort(logits, 1)[:, -1] - np.sort(logits, 1)[:, -2])


@pytest.mark.slow
def test_sharded_run_then_merge(
    tmp_path: Path, data_npz: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pseudo = ["--pseudo-margin", "always", "--pseudo-train-size", "60", "--pseudo-epochs", "30"]
    assert calibrate(tmp_path, data_npz, *pseudo, "--shard", "0", "--num-shards", "2") == 0
    assert "shard 0 of 2 done" in capsys.readouterr().out
    assert store.current_version(tmp_path, "fmnist-cnn-pgd") is None
    assert calibrate(tmp_path, data_npz, *pseudo, "--merge") == 2
    assert "run the missing shards first" in capsys.readouterr().err
    assert calibrate(tmp_path, data_npz, *pseudo, "--shard", "1", "--num-shards", "2") == 0
    # the merge attacks nothing: both the subset and the pseudo-margin points came from shards
    assert calibrate(tmp_path, data_npz, *pseudo, "--merge", "--version", "merged") == 0
    assert store.current_version(tmp_path, "fmnist-cnn-pgd") == "merged"
    record = store.read_record(tmp_path / "fmnist-cnn-pgd" / "merged")
    assert record.score_kind == "pseudo-margin"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--eps", "0"], "eps must be positive"),
        (["--eps", "-1"], "eps must be positive"),
        (["--attack", "pgd"], "unknown attack 'pgd'"),
        (["--attack", "ddn"], "does not support the linf norm"),
        (["--subset-size", "5000"], "has only 600 images"),
        (["--model", "fmnist-cnn", "--weights", "missing.safetensors"], "does not exist"),
        (["--model", "preact-resnet18", "--weights", "__resnet__"], "expects (3, 32, 32)"),
        (["--data-dir", "__empty__", "--dataset", "fashion-mnist"], "dataset-fashion-mnist"),
    ],
)
def test_bad_input_exits_2_with_a_message(
    args: list[str], message: str, tmp_path: Path, data_npz: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    if "__resnet__" in args:
        from marginwatch.models.architectures import PreActResNet18
        from marginwatch.models.registry import save_weights

        save_weights(PreActResNet18(), tmp_path / "resnet.safetensors")
        args = [str(tmp_path / "resnet.safetensors") if a == "__resnet__" else a for a in args]
    args = [str(tmp_path) if a == "__empty__" else a for a in args]
    base = ["--store", str(tmp_path / "store"), "--dataset", str(data_npz), "--quiet"]
    assert main([*base, *args]) == 2
    assert message in capsys.readouterr().err
    assert store.current_version(tmp_path / "store", "fmnist-cnn-pgd") is None


def test_second_concurrent_run_is_refused(
    tmp_path: Path, data_npz: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with store.model_lock(tmp_path, "fmnist-cnn-pgd"):
        assert calibrate(tmp_path, data_npz) == 3
    assert "another calibration of 'fmnist-cnn-pgd' is running" in capsys.readouterr().err


def _run_cli(args: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(  # type: ignore[call-overload,no-any-return]
        [sys.executable, "-m", "marginwatch.calibration", *args], cwd=PROJECT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs,
    )  # fmt: skip


@pytest.mark.slow
def test_killed_run_keeps_the_store_and_resumes(tmp_path: Path, data_npz: Path) -> None:
    assert calibrate(tmp_path, data_npz, "--version", "good") == 0
    before = (tmp_path / "fmnist-cnn-pgd" / "good" / ONNX_FILE).read_bytes()
    args = ["--store", str(tmp_path), "--dataset", str(data_npz), "--subset-size", "200",
            "--seed", "7", "--pseudo-margin", "never", *FAST]  # fmt: skip
    process = _run_cli(args)
    margins = tmp_path / "fmnist-cnn-pgd" / ".margins"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(margins.glob("*/chunk-*.npz"))) < 2:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert store.current_version(tmp_path, "fmnist-cnn-pgd") == "good"
    assert (tmp_path / "fmnist-cnn-pgd" / "good" / ONNX_FILE).read_bytes() == before
    store.read_record(tmp_path / "fmnist-cnn-pgd" / "good")
    finished = {p: p.stat().st_mtime_ns for p in margins.glob("*/chunk-*.npz")}
    assert finished, "the run was killed before finishing a chunk"
    assert main([*args, "--version", "resumed"]) == 0
    for path, mtime in finished.items():
        assert path.stat().st_mtime_ns == mtime, "a finished chunk was attacked again"
    assert store.current_version(tmp_path, "fmnist-cnn-pgd") == "resumed"


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


@pytest.mark.slow
def test_disk_full_leaves_the_store_untouched(tmp_path: Path, data_npz: Path) -> None:
    assert calibrate(tmp_path, data_npz, "--version", "good") == 0
    args = ["--store", str(tmp_path), "--dataset", str(data_npz), "--subset-size", "60",
            "--pseudo-margin", "never", "--version", "doomed", *FAST]  # fmt: skip
    process = _run_cli(args, preexec_fn=_limit_file_size)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 1, stderr.decode()
    assert b"store unchanged" in stderr
    assert store.current_version(tmp_path, "fmnist-cnn-pgd") == "good"
    assert not (tmp_path / "fmnist-cnn-pgd" / "doomed").exists()
    assert not list((tmp_path / "fmnist-cnn-pgd").glob(".staging-*"))
    record = CalibrationRecord.model_validate_json(
        (tmp_path / "fmnist-cnn-pgd" / "good" / "calibration.json").read_text()
    )
    assert record.version == "good"


@pytest.mark.parametrize("name", ["CURRENT", "current", "Current"])
def test_the_pointer_name_is_no_version(
    tmp_path: Path, data_npz: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A version named CURRENT took the pointer's place and wedged the model for good."""
    assert calibrate(tmp_path, data_npz, "--version", name) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "pointer file's name (CURRENT): choose another --version" in line
    assert not (tmp_path / "fmnist-cnn-pgd").exists()


@pytest.mark.slow
def test_a_store_wedged_by_a_version_named_current_recovers(tmp_path: Path, data_npz: Path) -> None:
    """An older release let `--version CURRENT` publish a folder named CURRENT, after which
    every publish failed; the next publish now moves it aside, hidden, and serves again."""
    wedged = tmp_path / "fmnist-cnn-pgd" / "CURRENT"
    wedged.mkdir(parents=True)
    (wedged / "calibration.json").write_text("{}")
    assert calibrate(tmp_path, data_npz, "--version", "v2") == 0
    assert store.current_version(tmp_path, "fmnist-cnn-pgd") == "v2"
    (aside,) = (tmp_path / "fmnist-cnn-pgd").glob(".CURRENT-folder-*")
    assert (aside / "calibration.json").read_text() == "{}"
    assert store.list_models(tmp_path) == ["fmnist-cnn-pgd"]


@pytest.mark.slow
def test_a_pointer_that_cannot_move_is_reported_as_a_changed_store(
    tmp_path: Path, data_npz: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert calibrate(tmp_path, data_npz, "--version", "good") == 0
    (tmp_path / "fmnist-cnn-pgd" / ".CURRENT.tmp").mkdir()  # the pointer's temp cannot be made
    capsys.readouterr()
    assert calibrate(tmp_path, data_npz, "--version", "stuck") == 1
    line = capsys.readouterr().err.splitlines()[-1]  # after the preflight's line
    assert "store unchanged" not in line
    assert "version stuck was added" in line and "the served version is unchanged" in line
    assert store.current_version(tmp_path, "fmnist-cnn-pgd") == "good"
    assert (tmp_path / "fmnist-cnn-pgd" / "stuck").is_dir()


@pytest.mark.slow
def test_json_output_is_the_record(
    tmp_path: Path, data_npz: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert calibrate(tmp_path, data_npz, "--json", "--version", "j") == 0
    printed = json.loads(capsys.readouterr().out)
    assert CalibrationRecord.model_validate(printed).version == "j"


def test_serving_graph_head_split() -> None:
    model = load_model("fmnist-cnn-pgd")
    inputs = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        logits, score = ServingGraph(model)(inputs)
    top = logits.topk(2, dim=1).values
    torch.testing.assert_close(score, top[:, 0] - top[:, 1])
