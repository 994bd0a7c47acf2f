"""The MLServer peer of `bench/peers.py` (see bench/peer_common.py): an `mlserver.MLModel` in
MLServer, its v2 REST endpoint, inference in the server's own process (`parallel_workers=0`),
access log off (`debug=False`). Its gRPC and metrics servers cannot be turned off: they listen on
ports the system picks. MLServer imports the model's class by name, `peer_mlserver.OnnxPeer`.

    PEER_MODEL=... PEER_ONNX=... PEER_THRESHOLD=... PEER_PORT=... python bench/peer_mlserver.py
"""

import asyncio

from mlserver import MLModel, MLServer
from mlserver.codecs import NumpyCodec
from mlserver.settings import ModelSettings, Settings
from mlserver.types import InferenceRequest, InferenceResponse
from peer_common import FlaggedOnnx, Spec


class OnnxPeer(MLModel):  # type: ignore[misc]
    async def load(self) -> bool:
        spec = Spec.from_env()
        self.model = FlaggedOnnx(spec.onnx, spec.threshold)
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        labels, brittle = self.model(NumpyCodec.decode_input(payload.inputs[0]))
        outputs = [NumpyCodec.encode_output("label", labels),
                   NumpyCodec.encode_output("brittle", brittle)]  # fmt: skip
        return InferenceResponse(model_name=self.name, outputs=outputs)


if __name__ == "__main__":
    spec = Spec.from_env()
    settings = Settings(host="127.0.0.1", http_port=spec.port, grpc_port=0, metrics_port=0,
                        parallel_workers=0, debug=False)  # fmt: skip
    model = ModelSettings(name=spec.model, implementation="peer_mlserver.OnnxPeer")
    asyncio.run(MLServer(settings).start([model]))
