"""What the strict-tensor check costs on the request path (service/decoding.py): the search of a
JSON body's bytes for `true`, `false` or a quoted number, against parsing and converting that
body, and against the single regex of three alternatives it replaced. In process; best of 5.

    python bench/strict_tensors.py
"""

from __future__ import annotations

import re
import timeit

import numpy as np
import orjson

from marginwatch.service.decoding import _may_hold_non_numbers

ONE_REGEX = re.compile(rb'true|false|"\s*[-+.0-9]')


def best_us(call: object, number: int) -> float:
    return min(timeit.repeat(call, number=number, repeat=5)) / number * 1e6  # type: ignore[arg-type]


def main() -> None:
    rng = np.random.default_rng(0)
    for batch in (1, 64):
        body = orjson.dumps({"inputs": rng.random((batch, 1, 28, 28), dtype=np.float32).tolist()})
        convert = best_us(lambda b=body: np.asarray(orjson.loads(b)["inputs"], np.float32), 20)
        regex = best_us(lambda b=body: ONE_REGEX.search(b), 50)
        searches = best_us(lambda b=body: _may_hold_non_numbers(b), 50)
        print(f"batch {batch:2d}: body {len(body):7,d} B; parse + convert {convert:6.0f} µs; "
              f"one regex {regex:6.0f} µs; three searches {searches:6.0f} µs "
              f"({regex / searches:.1f}× faster)")  # fmt: skip


if __name__ == "__main__":
    main()
