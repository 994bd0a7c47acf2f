"""LitServe serving the same ONNX graph with its own batching (one worker, one API server),
for the side-by-side in `bench/serve_load.py`. LitServe is installed only for this benchmark.

    python bench/litserve_baseline.py --onnx model.onnx --port 8002
"""

import argparse
from typing import Any

import litserve as ls
import numpy as np
import onnxruntime as ort


class OnnxAPI(ls.LitAPI):
    def __init__(self, onnx: str, threads: int, max_batch_size: int, batch_timeout: float) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.onnx = onnx
        self.threads = threads

    def setup(self, device: str) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(self.onnx, options, providers=["CPUExecutionProvider"])

    def decode_request(self, request: dict[str, Any]) -> np.ndarray:
        return np.asarray(request["inputs"], dtype=np.float32)

    def batch(self, inputs: list[np.ndarray]) -> tuple[np.ndarray, list[int]]:
        return np.concatenate(inputs), [len(x) for x in inputs]

    def predict(self, batch: Any) -> list[dict[str, list[Any]]]:
        if isinstance(batch, np.ndarray):  # max_batch_size 1: no batch() call
            batch = (batch, [len(batch)])
        x, sizes = batch
        logits, scores = self.session.run(["logits", "score"], {"input": x})
        labels = logits.argmax(1).tolist()
        scores_list = scores.tolist()
        outputs, start = [], 0
        for size in sizes:
            outputs.append(
                {
                    "labels": labels[start : start + size],
                    "scores": scores_list[start : start + size],
                }
            )
            start += size
        return outputs

    def unbatch(self, output: list[dict[str, list[Any]]]) -> list[dict[str, list[Any]]]:
        return output

    def encode_response(self, output: Any) -> Any:
        if isinstance(output, list):  # max_batch_size 1: predict returned a one-element list
            return output[0]
        return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--onnx", required=True, help="the serving graph (outputs logits, score)")
    parser.add_argument("--port", type=int, default=8002, help="TCP port on 127.0.0.1")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument("--max-batch-size", type=int, default=64, help="requests per batch")
    parser.add_argument("--batch-timeout", type=float, default=0.001, help="seconds to fill")
    args = parser.parse_args()
    api = OnnxAPI(args.onnx, args.threads, args.max_batch_size, args.batch_timeout)
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1)
    server.run(host="127.0.0.1", port=args.port, num_api_servers=1, log_level="warning",
               generate_client_file=False)  # fmt: skip


if __name__ == "__main__":
    main()
