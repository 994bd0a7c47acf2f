"""The parts of `bench/peers.py` that decide what its table says, on real text: wrk's output as
captured from a run against the minimal endpoint, the answers of the service and of the framework
peers as captured from their servers, and the per-round ratios. Also: `--help` and bad options,
and that stopping a server leaves none of its processes behind. No framework is installed and
nothing is timed: the figures are measured by the bench itself."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import onnxruntime as ort
import pytest

from marginwatch.models.data import load_dataset

BENCH = Path(__file__).resolve().parents[2] / "bench"
THRESHOLD = 0.22578436136245728  # λ of the version that answered the captured bodies below

# `wrk -t 2 -c 4 -d 1s -s post.lua` (overload.WRK_LUA) against bench/minimal_baseline.py
WRK_OK = (
    "Running 1s test @ http://127.0.0.1:38229/v2/models/fmnist-cnn-pgd/infer\n"
    "  2 threads and 4 connections\n"
    "  Thread Stats   Avg      Stdev     Max   +/- Stdev\n"
    "    Latency     3.38ms    2.79ms  21.59ms   80.95%\n"
    "    Req/Sec   644.86    177.45     1.16k    71.43%\n"
    "  1353 requests in 1.09s, 400.47KB read\n"
    "Requests/sec:   1237.45\n"
    "Transfer/sec:    366.27KB\n"
    'RESULT {"statuses": [{"200": 684}, {"200": 669}], "duration_us": 1093381, "requests": 1353, '
    '"timeouts": 0, "connect_errors": 0, "read_errors": 0, "write_errors": 0, "p50_us": 2851, '
    '"p90_us": 7136, "p99_us": 10507, "max_us": 21593}\n'
)
# the same, one thread, at a path the endpoint does not have
WRK_404 = (
    "Running 1s test @ http://127.0.0.1:38229/v2/models/nope/infer\n"
    "  1 threads and 2 connections\n"
    "  Thread Stats   Avg      Stdev     Max   +/- Stdev\n"
    "    Latency     1.64ms    2.29ms  12.81ms   83.99%\n"
    "    Req/Sec     3.35k   264.26     3.93k    80.00%\n"
    "  3368 requests in 1.01s, 506.52KB read\n"
    "  Non-2xx or 3xx responses: 3368\n"
    "Requests/sec:   3336.75\n"
    "Transfer/sec:    501.82KB\n"
    'RESULT {"statuses": [{"404": 3368}], "duration_us": 1009364, "requests": 3368, '
    '"timeouts": 0, "connect_errors": 0, "read_errors": 0, "write_errors": 0, "p50_us": 202, '
    '"p90_us": 5175, "p99_us": 9347, "max_us": 12810}\n'
)
# answers to the bench's check bodies, as each server sent them (the service's parameters cut)
ANSWERS = {
    "marginwatch": (
        b'{"model_name":"fmnist-cnn-pgd","model_version":"20261201T193456Z","id":null,'
        b'"parameters":{"threshold":0.22578436136245728,"guard_band":0.0},"outputs":[{"name":'
        b'"logits","shape":[1,10],"datatype":"FP32","data":[0.7172351479530334,'
        b"-2.6614487171173096,4.857591152191162,-1.3031203746795654,5.128836631774902,"
        b"-5.751451015472412,4.95939826965332,-9.381719589233398,-0.837704062461853,"
        b'-7.741549491882324]},{"name":"label","shape":[1],"datatype":"INT64","data":[4]},'
        b'{"name":"score","shape":[1],"datatype":"FP32","data":[-0.029880989342927933]},'
        b'{"name":"brittle","shape":[1],"datatype":"BOOL","data":[true]},{"name":"borderline",'
        b'"shape":[1],"datatype":"BOOL","data":[false]},{"name":"p_robust","shape":[1],'
        b'"datatype":"FP32","data":[null]}]}',
        ([4], [True]),
    ),
    "minimal (its score against λ)": (
        b'{"model_name":"fmnist-cnn-pgd","outputs":[{"name":"label","datatype":"INT64",'
        b'"shape":[1],"data":[4]},{"name":"score","datatype":"FP32","shape":[1],'
        b'"data":[-0.029880989342927933]}]}',
        ([4], [True]),
    ),
    "kserve": (
        b'{"model_name":"fmnist-cnn-pgd","model_version":null,'
        b'"id":"97c5ae66-7668-48e7-b319-e4170c2430ec","parameters":null,"outputs":[{"name":'
        b'"label","shape":[1],"datatype":"INT64","parameters":null,"data":[7]},{"name":"brittle",'
        b'"shape":[1],"datatype":"BOOL","parameters":null,"data":[false]}]}',
        ([7], [False]),
    ),
    "mlserver (shape [1, 1])": (
        b'{"model_name":"fmnist-cnn-pgd","id":"b8868092-bd83-46d8-93b4-251e4e12cf5c",'
        b'"parameters":{},"outputs":[{"name":"label","shape":[1,1],"datatype":"INT64",'
        b'"parameters":{"content_type":"np"},"data":[7]},{"name":"brittle","shape":[1,1],'
        b'"datatype":"BOOL","parameters":{"content_type":"np"},"data":[false]}]}',
        ([7], [False]),
    ),
}


@pytest.fixture(scope="module")
def peers() -> Iterator[ModuleType]:
    """bench/peers.py as a module; bench/ on the path for its siblings (bench/ is no package)."""
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("peers")
    finally:
        sys.path.remove(str(BENCH))


def test_help_explains_every_option() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH / "peers.py"), "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    for option in ("--peers", "--rounds", "--duration-s", "--warmup-s", "--concurrency",
                   "--outputs", "--server-cpus", "--client-cpus", "--start-timeout-s",
                   "--peers-dir", "--reinstall", "--out"):  # fmt: skip
        assert f"  {option} " in done.stdout, option
    for peer in ("minimal", "litserve", "kserve", "mlserver", "bentoml", "ray"):
        assert peer in done.stdout


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--rounds", "0"], "--rounds"),
        (["--concurrency", "1", "0"], "--concurrency"),
        (["--server-cpus", "4096"], "--server-cpus"),
        (["--client-cpus", "zero"], "--client-cpus"),
    ],
)
def test_a_bad_option_is_one_line_naming_it_and_exit_2(
    peers: ModuleType, argv: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        peers.parse_args(argv)
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("peers.py: ") and named in lines[0]


def test_wrk_output_becomes_a_point(peers: ModuleType) -> None:
    result = peers.parse_wrk(WRK_OK)
    assert result["ok"] == 684 + 669  # summed over wrk's two threads
    point = peers.to_point("minimal", 4, 0, result)
    assert (point.requests, point.errors) == (1353, 0)
    assert point.requests_per_s == pytest.approx(1353 / 1.093381)
    assert (point.p50_ms, point.p99_ms) == (2.851, 10.507)

    refused = peers.to_point("minimal", 2, 0, peers.parse_wrk(WRK_404))
    assert (refused.requests, refused.errors, refused.requests_per_s) == (3368, 3368, 0.0)


def test_a_ratio_is_the_median_of_the_ratios_within_each_round(peers: ModuleType) -> None:
    def point(server: str, round_: int, rate: float) -> object:
        return peers.Point(server, 8, round_, 0, 0, rate, 1.0, 2.0, 0.0)

    ours = [point("marginwatch", r, rate) for r, rate in enumerate((100.0, 200.0, 300.0))]
    theirs = [point("kserve", r, rate) for r, rate in enumerate((50.0, 100.0, 300.0))]
    # a round the peer failed: no ratio from it, and no point in its medians
    ray = [point("ray", 1, 40.0)]
    rows = peers.table(ours + theirs + ray, ["marginwatch", "kserve", "ray"], [8])
    assert rows[2:] == [
        "| 8 | marginwatch | 200 | 1.00 | 2.00 |  |",
        "| 8 | kserve | 100 | 1.00 | 2.00 | 2.00× (2.00, 2.00, 1.00) |",
        "| 8 | ray | 40 | 1.00 | 2.00 | 5.00× |",
    ]


@pytest.mark.parametrize("server", ANSWERS)
def test_each_servers_answer_reads_as_labels_and_flags(peers: ModuleType, server: str) -> None:
    import peer_process

    content, expected = ANSWERS[server]
    assert peer_process.answer(content, THRESHOLD) == expected


@pytest.mark.parametrize("outputs", [[], ["label", "brittle"]])
def test_the_checks_are_the_shared_body_and_a_brittle_and_a_robust_image_with_orts_answers(
    peers: ModuleType, outputs: list[str]
) -> None:
    from marginwatch.artifact.store import current_dir, default_store, read_record

    version = current_dir(default_store(), "fmnist-cnn-pgd")
    threshold = read_record(version).threshold
    spec = peers.Spec("fmnist-cnn-pgd", str(version / "model.onnx"), threshold, 0)
    checks = peers.make_checks(spec, outputs)
    images = load_dataset("fashion-mnist-subset", "test").float_images
    shared = json.loads(peers.request_body("v2", images[:1]))
    asked = {"outputs": [{"name": name} for name in outputs]} if outputs else {}
    assert json.loads(checks[0][0]) == shared | asked
    session = ort.InferenceSession(spec.onnx, providers=["CPUExecutionProvider"])
    for content, expected in checks:
        tensor = json.loads(content)["inputs"][0]
        x = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
        logits, scores = session.run(["logits", "score"], {"input": x})
        assert expected == (logits.argmax(1).tolist(), (scores < threshold).tolist())
    assert {flags[0] for _, (_, flags) in checks} == {True, False}


def test_heavy_frameworks_are_refused_and_small_nvidia_bindings_are_not(
    peers: ModuleType,
) -> None:
    from peer_envs import heavy_packages

    names = ["numpy", "Torch", "nvidia-cublas-cu12", "nvidia-ml-py", "fastapi"]
    report = json.dumps({"install": [{"metadata": {"name": name}} for name in names]})
    assert heavy_packages(report) == {"torch", "nvidia-cublas-cu12"}


# a server that starts a process in a process group of its own (as Ray does), then waits
SPAWNER = """
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], process_group=0)
open(sys.argv[1] + ".tmp", "w").write(str(child.pid))
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(600)
"""


def test_stopping_a_server_leaves_none_of_its_processes(peers: ModuleType, tmp_path: Path) -> None:
    import peer_process

    pid_file = tmp_path / "child.pid"
    command = [sys.executable, "-c", SPAWNER, str(pid_file)]
    with pytest.raises(peer_process.ServerFailed), peer_process.serving(
        command, {}, tmp_path / "server.log", cwd=tmp_path
    ) as process:  # fmt: skip
        way_out = time.monotonic() + 60
        while not pid_file.exists():
            assert process.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < way_out, "the server never started its child"
            time.sleep(0.05)
        raise peer_process.ServerFailed("a failed check")  # the path a failure takes
    child = int(pid_file.read_text())
    assert process.returncode is not None
    assert peer_process.state(child) in (None, "Z")  # gone, or dead and waiting for init
