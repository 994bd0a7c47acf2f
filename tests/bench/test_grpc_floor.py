"""The parts of `bench/grpc_floor.py` that decide what its table says, without h2load (the bench
needs it; CI has none): h2load's output as captured from a run here, the gRPC framing of the body
it posts, the empty server that stands for grpcio's floor (started for real and called with
grpcio), and the one-line refusal when a load generator is missing."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from ports import free_port
from tritonclient.grpc import service_pb2

BENCH = Path(__file__).resolve().parents[2] / "bench"

# `h2load -c 1 -m 8 -D 3 --data grpc.body ...` against marginwatch-serve's gRPC port (its tail)
H2LOAD_OUTPUT = (
    "finished in 3.00s, 2281.33 req/s, 1.52MB/s\n"
    "requests: 6852 total, 6852 started, 6844 done, 6844 succeeded, 8 failed, 0 errored, "
    "0 timeout\n"
    "status codes: 6844 2xx, 0 3xx, 0 4xx, 0 5xx\n"
    "traffic: 4.57MB (4790440) total, 20.55KB (21042) headers (space savings 96.27%), "
    "4.22MB (4407536) data\n"
)


@pytest.fixture(scope="module")
def floor() -> Iterator[ModuleType]:
    """bench/grpc_floor.py as a module; bench/ on the path for its siblings (bench/ is no
    package)."""
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("grpc_floor")
    finally:
        sys.path.remove(str(BENCH))


def test_h2load_output_gives_rate_successes_and_failures(floor: ModuleType) -> None:
    rate = floor.H2LOAD_RATE.search(H2LOAD_OUTPUT)
    counts = floor.H2LOAD_COUNTS.search(H2LOAD_OUTPUT)
    assert rate is not None and counts is not None
    assert float(rate.group(1)) == 2281.33
    assert (int(counts.group(1)), int(counts.group(2))) == (6844, 8)


def test_the_posted_body_is_one_framed_model_infer_request(
    floor: ModuleType, tmp_path: Path
) -> None:
    image = np.linspace(0, 1, 784, dtype=np.float32).reshape(1, 1, 28, 28)
    message = floor.grpc_request("fmnist-cnn-pgd", image)
    floor.write_scratch(tmp_path, {"grpc": message, "http_json": b'{"inputs": []}'})
    framed = (tmp_path / "grpc.body").read_bytes()
    assert framed[0] == 0  # not compressed
    assert int.from_bytes(framed[1:5], "big") == len(framed) - 5
    request = service_pb2.ModelInferRequest.FromString(framed[5:])
    assert request.model_name == "fmnist-cnn-pgd"
    assert list(request.inputs[0].shape) == [1, 1, 28, 28]
    sent = np.frombuffer(request.raw_input_contents[0], dtype="<f4").reshape(image.shape)
    assert np.array_equal(sent, image)
    assert str(tmp_path / "body.json") in (tmp_path / "post.lua").read_text()


def test_the_empty_server_answers_and_counts_its_calls(floor: ModuleType) -> None:
    port = free_port()
    line = [sys.executable, str(BENCH / "grpc_floor.py"), "--serve-empty", str(port)]
    server = subprocess.Popen(line, stderr=subprocess.DEVNULL)
    try:
        for _ in range(3):
            answer = floor.call(port, floor.INFER, b"any bytes: nothing reads them")
        assert service_pb2.ModelInferResponse.FromString(answer).model_name == "grpc_empty"
        assert floor.call(port, floor.CALLS, b"") == b"3"
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_missing_load_generator_is_refused_in_one_line(tmp_path: Path) -> None:
    # a PATH without h2load and wrk (the interpreter is named by its full path)
    env = {**os.environ, "PATH": str(tmp_path)}
    line = [sys.executable, str(BENCH / "grpc_floor.py"), "--rounds", "1"]
    done = subprocess.run(line, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "grpc_floor.py: h2load is not on the PATH: apt-get install nghttp2-client is needed"
    )
