"""The Ray Serve peer of `bench/peers.py` (see bench/peer_common.py): one deployment (1 replica)
behind Ray Serve's HTTP proxy, on a local Ray cluster of its own (no dashboard, no usage
reports), access log off. SIGTERM shuts Serve and Ray down, which stops the processes Ray
started (bench/peers.py still kills whatever is left of the tree, by id).

    PEER_MODEL=... PEER_ONNX=... PEER_THRESHOLD=... PEER_PORT=... python bench/peer_ray.py
"""

# No `from __future__ import annotations`: Ray Serve reads `__call__`'s annotations.
import signal
from typing import Any

import ray
from peer_common import FlaggedOnnx, Spec, v2_input, v2_response
from ray import serve
from starlette.requests import Request


@serve.deployment(num_replicas=1)
class OnnxPeer:
    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.model = FlaggedOnnx(spec.onnx, spec.threshold)

    async def __call__(self, request: Request) -> dict[str, Any]:
        return v2_response(self.spec.model, *self.model(v2_input(await request.json())))


def stop(*_: object) -> None:
    raise SystemExit(0)


def main() -> None:
    spec = Spec.from_env()
    logging = {"log_level": "WARNING", "enable_access_log": False}
    ray.init(include_dashboard=False, logging_level="warning", log_to_driver=False)
    signal.signal(signal.SIGTERM, stop)  # after ray.init, whose own handler only aborts
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": spec.port}, logging_config=logging)
        # `bind` comes with the decorator, which mypy cannot see without Ray installed
        app = OnnxPeer.bind(spec)  # type: ignore[attr-defined]
        serve.run(app, route_prefix=spec.path, logging_config=logging)
        signal.pause()
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
