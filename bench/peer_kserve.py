"""The KServe peer of `bench/peers.py` (see bench/peer_common.py): a `kserve.Model` behind
KServe's ModelServer, its v2 REST endpoint, one worker, gRPC off, access log off (KServe's
logging configuration logs every request; KSERVE_LOGLEVEL covers only its own loggers). KServe
binds 0.0.0.0.

    PEER_MODEL=... PEER_ONNX=... PEER_THRESHOLD=... PEER_PORT=... python bench/peer_kserve.py
"""

import logging
from typing import Any

import kserve
from kserve import InferOutput, InferRequest, InferResponse
from kserve.utils.utils import generate_uuid
from peer_common import FlaggedOnnx, Spec


class OnnxPeer(kserve.Model):  # type: ignore[misc]
    def __init__(self, spec: Spec) -> None:
        super().__init__(spec.model)
        self.model = FlaggedOnnx(spec.onnx, spec.threshold)
        self.ready = True

    async def predict(
        self, payload: InferRequest, headers: Any = None, response_headers: Any = None
    ) -> InferResponse:
        labels, brittle = self.model(payload.inputs[0].as_numpy())
        outputs = [InferOutput("label", list(labels.shape), "INT64", labels),
                   InferOutput("brittle", list(brittle.shape), "BOOL", brittle)]  # fmt: skip
        # as KServe's own model servers do: the request's id, else a fresh one
        return InferResponse(payload.id or generate_uuid(), self.name, outputs)


if __name__ == "__main__":
    spec = Spec.from_env()
    server = kserve.ModelServer(
        http_port=spec.port, workers=1, enable_grpc=False, enable_latency_logging=False
    )
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)  # configured by the server
    server.start([OnnxPeer(spec)])
