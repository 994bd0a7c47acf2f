"""The LitServe peer of `bench/peers.py` (see bench/peer_common.py): the API of
bench/litserve_baseline.py (its session, batching and unbatching; one inference worker, one API
server) reading the OIP v2 body and answering with the flag. LitServe's worker process imports
`OipAPI` by name, so it is a module-level class.

    PEER_MODEL=... PEER_ONNX=... PEER_THRESHOLD=... PEER_PORT=... python bench/peer_litserve.py
"""

from typing import Any

import litserve as ls
import numpy as np
from litserve_baseline import OnnxAPI  # a sibling: Python puts a script's folder on the path
from peer_common import Spec, v2_input, v2_response

SPEC = Spec.from_env()


class OipAPI(OnnxAPI):
    def decode_request(self, request: dict[str, Any]) -> np.ndarray:
        return v2_input(request)

    def encode_response(self, output: Any) -> Any:
        answer = super().encode_response(output)
        brittle = np.asarray(answer["scores"]) < SPEC.threshold
        return v2_response(SPEC.model, np.asarray(answer["labels"]), brittle)


if __name__ == "__main__":
    api = OipAPI(SPEC.onnx, 1, max_batch_size=64, batch_timeout=0.001)
    api.api_path = SPEC.path
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1)
    server.run(host="127.0.0.1", port=SPEC.port, num_api_servers=1, log_level="warning",
               generate_client_file=False)  # fmt: skip
