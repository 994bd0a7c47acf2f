"""The do-it-yourself baseline: a minimal FastAPI endpoint that parses the body and calls ONNX
Runtime, with no validation, metrics, batching or flag. Started by `bench/serve_load.py`.

    python bench/minimal_baseline.py --onnx model.onnx --port 8001
"""

from __future__ import annotations

import argparse

import numpy as np
import onnxruntime as ort
import orjson
import uvicorn
from fastapi import FastAPI, Request, Response


def build_app(onnx: str, threads: int) -> FastAPI:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(onnx, options, providers=["CPUExecutionProvider"])
    app = FastAPI()

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        x = np.asarray(orjson.loads(await request.body())["inputs"], dtype=np.float32)
        logits, scores = session.run(["logits", "score"], {"input": x})
        body = {"labels": logits.argmax(1).tolist(), "scores": scores.tolist()}
        return Response(orjson.dumps(body), media_type="application/json")

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--onnx", required=True, help="the serving graph (outputs logits, score)")
    parser.add_argument("--port", type=int, default=8001, help="TCP port on 127.0.0.1")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    args = parser.parse_args()
    uvicorn.run(build_app(args.onnx, args.threads), host="127.0.0.1", port=args.port,
                log_level="warning", access_log=False)  # fmt: skip


if __name__ == "__main__":
    main()
