"""Image files against float JSON on the v1 route: request throughput of one server.

One `marginwatch-serve` process; the same Fashion-MNIST test images sent three ways to
`POST /v1/models/{name}/predict`:

- `floats`: `{"inputs": [...]}`, the pixels / 255 as JSON numbers (what `bench/serve_load.py`
  sends);
- `form-png`: a multipart form, one `file` part per image, each a 28×28 gray PNG (about 600 bytes);
- `json-png`: `{"images": ["<base64 PNG>", ...]}`.

For each body size (`--images` per request) and concurrency, each encoding in turn sends requests
back to back for `--duration-s` over keep-alive connections (the lean asyncio client of
`bench/serve_load.py`); the order of the encodings rotates from point to point, and `--rounds`
repeats everything. Figures are medians over rounds; a ratio is the median of the per-round
ratios to `floats`, so both sides of it come from the same minutes. Before timing, one request of
each encoding must give the same predictions as the float request.

    python bench/image_requests.py                      # 1 and 32 images, concurrency 1 and 32
    python bench/image_requests.py --rounds 5 --duration-s 3 --images 1

The model comes from `--store`, else from `artifacts/`, else a store made in a temporary folder
(as `bench/serve_load.py` does).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import statistics
import tempfile
import urllib.request
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import orjson
from PIL import Image
from serve_load import (  # a sibling: Python puts a script's folder on the path
    Point,
    choose_model,
    encode_request,
    free_port,
    load,
    median_ratio,
    running,
    server_command,
    summarise,
    wait_ready,
)

from marginwatch.models.data import load_dataset

ENCODINGS = ("floats", "form-png", "json-png")
BOUNDARY = "marginwatch-bench-boundary"


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def bodies(images: np.ndarray) -> dict[str, tuple[str, bytes]]:
    """Content-Type and body of each encoding, for uint8 N×1×H×W images."""
    files = [png(image[0]) for image in images]
    parts = b"".join(
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{index}.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + data
        + b"\r\n"
        for index, data in enumerate(files)
    )
    floats = (images.astype(np.float32) / 255.0).tolist()
    return {
        "floats": ("application/json", orjson.dumps({"inputs": floats})),
        "form-png": (
            f"multipart/form-data; boundary={BOUNDARY}",
            parts + f"--{BOUNDARY}--\r\n".encode(),
        ),
        "json-png": (
            "application/json",
            orjson.dumps({"images": [base64.b64encode(data).decode() for data in files]}),
        ),
    }


def predictions(port: int, path: str, content_type: str, body: bytes) -> object:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", body, {"Content-Type": content_type}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return orjson.loads(response.read())["predictions"]


def report(points: list[Point], sizes: dict[tuple[int, str], int]) -> None:
    """Medians over rounds; `sizes`: the body bytes of each (images, encoding)."""
    groups: dict[tuple[int, int, str], list[Point]] = {}
    for point in points:
        groups.setdefault((point.images, point.concurrency, point.server), []).append(point)
    by_round = {(p.images, p.concurrency, p.server, p.round): p for p in points}
    print("\n| images | concurrency | encoding | body bytes | req/s | p50 ms | p99 ms | errors "
          "| req/s vs floats (rounds) |")  # fmt: skip
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for (images, concurrency, encoding), group in groups.items():
        rate, p50, p99 = (statistics.median(getattr(p, field) for p in group)
                          for field in ("requests_per_s", "p50_ms", "p99_ms"))  # fmt: skip
        ratio = ""
        if encoding != "floats":
            per_round = [
                p.requests_per_s / floats.requests_per_s
                for p in group
                if (floats := by_round.get((images, concurrency, "floats", p.round)))
            ]
            ratio = median_ratio(per_round, bold=True)
        size = sizes[(images, encoding)]
        errors = sum(p.errors for p in group)  # over every round: 503s past the deadline
        print(f"| {images} | {concurrency} | {encoding} | {size} | {rate:.0f} | {p50:.2f} | "
              f"{p99:.2f} | {errors} | {ratio} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--images", nargs="+", type=int, default=[1, 32], help="images per request")
    parser.add_argument("--duration-s", type=float, default=3.0, help="seconds per measurement")
    parser.add_argument("--warmup-s", type=float, default=0.5, help="seconds of warm-up per body")
    parser.add_argument("--rounds", type=int, default=3, help="repeats; figures are medians")
    parser.add_argument("--store", type=Path, default=None, help="artifact store to serve from")
    parser.add_argument("--out", type=Path, default=None, help="write the points as JSON here")
    args = parser.parse_args()
    images = load_dataset("fashion-mnist-subset", "test").images
    points: list[Point] = []
    with tempfile.TemporaryDirectory() as scratch:
        store, model = choose_model(args.store, Path(scratch))
        port = free_port()
        path = f"/v1/models/{model}/predict"
        print(f"model {model} from {store}; {os.cpu_count()} CPUs; load average before "
              f"{os.getloadavg()[0]:.2f}")  # fmt: skip
        command = server_command("marginwatch", store, model, port, threads=1)
        with running(command, {"MARGINWATCH_INTRA_OP_THREADS": "1"}) as process:
            encoded = {n: bodies(images[:n]) for n in args.images}
            requests = {
                (n, encoding): encode_request(path, body, content_type)
                for n in args.images
                for encoding, (content_type, body) in encoded[n].items()
            }
            wait_ready(port, requests[(args.images[0], "floats")], process)
            for n in args.images:
                expected = predictions(port, path, *encoded[n]["floats"])
                for encoding in ENCODINGS[1:]:
                    assert predictions(port, path, *encoded[n][encoding]) == expected, encoding
            for round_ in range(args.rounds):
                for index, (n, concurrency) in enumerate(
                    (n, c) for n in args.images for c in args.concurrency
                ):
                    shift = (index + round_) % len(ENCODINGS)
                    for encoding in ENCODINGS[shift:] + ENCODINGS[:shift]:
                        request = requests[(n, encoding)]
                        asyncio.run(load(port, request, concurrency, args.warmup_s))
                        latencies, errors = asyncio.run(
                            load(port, request, concurrency, args.duration_s)
                        )
                        point = summarise(
                            encoding, n, concurrency, latencies=latencies, errors=errors,
                            duration_s=args.duration_s,
                        )  # fmt: skip
                        points.append(replace(point, round=round_))
                        print(f"  round {round_}" + points[-1].line(), flush=True)
    print(f"load average after {os.getloadavg()[0]:.2f}")
    report(points, {(n, e): len(encoded[n][e][1]) for n in args.images for e in ENCODINGS})
    if args.out:
        args.out.write_text(json.dumps({"points": [asdict(p) for p in points]}, indent=2))


if __name__ == "__main__":
    main()
