"""The BentoML peer of `bench/peers.py` (see bench/peer_common.py): a service with one API that
takes the OIP v2 JSON body as its arguments (`inputs`; `outputs`, which it ignores: it always
answers with the label and the flag), one worker, access log off. BentoML's worker process
imports the service by name, so it is a module-level class:

    PEER_MODEL=... PEER_ONNX=... PEER_THRESHOLD=... \\
        bench/.peers/bentoml/bin/bentoml serve peer_bentoml:OnnxPeer --working-dir bench --port N
"""

from __future__ import annotations

from typing import Any

import bentoml
from peer_common import FlaggedOnnx, Spec, v2_input, v2_response

SPEC = Spec.from_env()


@bentoml.service(workers=1, logging={"access": {"enabled": False}})
class OnnxPeer:
    def __init__(self) -> None:
        self.model = FlaggedOnnx(SPEC.onnx, SPEC.threshold)

    @bentoml.api(route=SPEC.path)
    async def infer(
        self, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        return v2_response(SPEC.model, *self.model(v2_input({"inputs": inputs})))
