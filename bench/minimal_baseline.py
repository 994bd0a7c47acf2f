"""The do-it-yourself baseline: a minimal FastAPI endpoint that parses the body and calls ONNX
Runtime, with no validation, metrics, batching or flag. Started by `bench/serve_load.py`.

Two routes, one per body the service is compared on:
- `POST /predict`: `{"inputs": [...]}` (nested lists), answering labels and scores;
- `POST /v2/models/<model>/infer`: the Open Inference Protocol v2 JSON body (one input tensor,
  `shape` and flat or nested `data`), answering the `label` and `score` outputs in OIP v2 JSON.
  The path is a literal one for `--model`, not a path parameter: a hand-written endpoint for
  one model pays for no path-parameter matching or validation.

    python bench/minimal_baseline.py --onnx model.onnx --port 8001 [--model fmnist-cnn-pgd]
"""

from __future__ import annotations

import argparse

import numpy as np
import onnxruntime as ort
import orjson
import uvicorn
from fastapi import FastAPI, Request, Response

OUTPUTS = ["logits", "score"]


def build_app(onnx: str, threads: int, model: str = "fmnist-cnn-pgd") -> FastAPI:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(onnx, options, providers=["CPUExecutionProvider"])
    app = FastAPI()

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        x = np.asarray(orjson.loads(await request.body())["inputs"], dtype=np.float32)
        logits, scores = session.run(OUTPUTS, {"input": x})
        body = {"labels": logits.argmax(1).tolist(), "scores": scores.tolist()}
        return Response(orjson.dumps(body), media_type="application/json")

    @app.post(f"/v2/models/{model}/infer")
    async def infer(request: Request) -> Response:
        tensor = orjson.loads(await request.body())["inputs"][0]
        x = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
        logits, scores = session.run(OUTPUTS, {"input": x})
        shape = [len(scores)]
        outputs = [
            {
                "name": "label",
                "datatype": "INT64",
                "shape": shape,
                "data": logits.argmax(1).tolist(),
            },
            {"name": "score", "datatype": "FP32", "shape": shape, "data": scores.tolist()},
        ]
        body = orjson.dumps({"model_name": model, "outputs": outputs})
        return Response(body, media_type="application/json")

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--onnx", required=True, help="the serving graph (outputs logits, score)")
    parser.add_argument("--port", type=int, default=8001, help="TCP port on 127.0.0.1")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument("--model", default="fmnist-cnn-pgd", help="the model name in the v2 path")
    args = parser.parse_args()
    uvicorn.run(build_app(args.onnx, args.threads, args.model), host="127.0.0.1", port=args.port,
                log_level="warning", access_log=False)  # fmt: skip


if __name__ == "__main__":
    main()
