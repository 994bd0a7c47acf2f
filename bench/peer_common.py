"""What the framework peers of `bench/peers.py` share: the service's ONNX graph at one ONNX Runtime
thread and λ, and Open Inference Protocol v2 JSON in and out. Each peer (`bench/peer_<name>.py`)
answers the same one-image OIP v2 JSON body, on `/v2/models/<model>/infer`, with what the service
answers it: the label and the brittleness flag `score < λ`. A peer runs inside its own virtual
environment (its framework, onnxruntime and numpy: never the project), so this module imports
nothing else. (The minimal endpoint is bench/minimal_baseline.py's, run with the project's own
packages.)

A peer is configured by environment (`Spec.from_env`), set by bench/peers.py: BentoML's,
LitServe's and MLServer's worker processes import the peer's classes by name, in processes of
their own, and KServe parses the command line when it is imported. Every peer runs in one
process with one worker where its framework allows it (LitServe and Ray Serve always add
processes), with per-request access logs off, through its framework's own request parsing and
response encoding. None batches requests but LitServe, with the settings of `bench/serve_load.py`
(up to 64 requests, 1 ms).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort


@dataclass(frozen=True)
class Spec:
    model: str
    onnx: str
    threshold: float
    port: int

    @classmethod
    def from_env(cls) -> Spec:
        env = os.environ
        return cls(env["PEER_MODEL"], env["PEER_ONNX"], float(env["PEER_THRESHOLD"]),
                   int(env["PEER_PORT"]))  # fmt: skip

    def env(self) -> dict[str, str]:
        return {"PEER_MODEL": self.model, "PEER_ONNX": self.onnx,
                "PEER_THRESHOLD": repr(self.threshold), "PEER_PORT": str(self.port)}  # fmt: skip

    @property
    def path(self) -> str:
        return f"/v2/models/{self.model}/infer"


class FlaggedOnnx:
    """The serving graph at one ONNX Runtime thread, and λ: each input's label and flag."""

    def __init__(self, onnx: str, threshold: float) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(onnx, options, providers=["CPUExecutionProvider"])
        self.threshold = threshold

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, scores = self.session.run(["logits", "score"], {"input": x})
        return logits.argmax(1), scores < self.threshold


def v2_input(payload: dict[str, Any]) -> np.ndarray:
    """The first input tensor of a parsed OIP v2 JSON body, without checks (as a hand-written
    endpoint would read it)."""
    tensor = payload["inputs"][0]
    return np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])


def v2_response(model: str, labels: np.ndarray, brittle: np.ndarray) -> dict[str, Any]:
    shape = [len(labels)]
    return {
        "model_name": model,
        "outputs": [
            {"name": "label", "datatype": "INT64", "shape": shape, "data": labels.tolist()},
            {"name": "brittle", "datatype": "BOOL", "shape": shape, "data": brittle.tolist()},
        ],
    }
