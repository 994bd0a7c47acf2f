"""The live robust-accuracy window: the mean of g(score) over the most recent served predictions,
where g is the calibration's curve P(correct and robust | score). The collector in `metrics.py`
feeds it at fold time and exports its mean as `marginwatch_live_robust_accuracy_ratio`."""

from __future__ import annotations

import numpy as np


class LiveWindow:
    """The mean of g(score) over the last `size` served predictions (a ring buffer)."""

    def __init__(self, size: int) -> None:
        self._values = np.zeros(size, dtype=np.float64)
        self._next = 0
        self._count = 0
        self._sum = 0.0

    def add(self, values: np.ndarray) -> float:
        """Append `values` (the newest last) and return the window's mean."""
        size = len(self._values)
        values = np.asarray(values, dtype=np.float64)[-size:]
        positions = (self._next + np.arange(len(values))) % size
        # a running sum keeps this O(batch), not O(window); it is rebuilt at each wrap-around so
        # float error cannot accumulate
        self._sum += float(values.sum()) - float(self._values[positions].sum())
        self._values[positions] = values
        self._next = (self._next + len(values)) % size
        self._count = min(self._count + len(values), size)
        if self._next < len(values):
            self._sum = float(self._values[: self._count].sum())
        return self.mean()

    def mean(self) -> float:
        return self._sum / self._count if self._count else float("nan")

    def __len__(self) -> int:
        return self._count
