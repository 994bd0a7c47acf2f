"""The live robust-accuracy window: the mean of g(score) over the most recent served predictions,
where g is the calibration's curve P(correct and robust | score). The collector in
`served_traffic.py` keeps one per budget of the served version's grid (each with that budget's
g), feeds them at fold time and exports their means as `marginwatch_live_robust_accuracy_ratio`
(label `eps`) and the served budget's size as `marginwatch_live_window_predictions`.

The window is bounded by count and by age. By count alone, a replica that stops receiving traffic
would export the mean of its last predictions forever, however old: a frozen gauge that an alert
reads as current. With the age bound its window empties instead, and the alerts' guard (enough
predictions per replica) leaves it out. A prediction's time is when it was folded, at most one
scrape interval after it was served.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np


class LiveWindow:
    """The mean of g(score) over the last `size` served predictions that are at most
    `max_age_s` old (a ring buffer of values and their times, oldest at `_start`)."""

    def __init__(
        self,
        size: int,
        max_age_s: float = math.inf,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if size <= 0 or max_age_s <= 0:
            raise ValueError(f"need size > 0 and max_age_s > 0, not {size} and {max_age_s}")
        self._values = np.zeros(size, dtype=np.float64)
        self._times = np.zeros(size, dtype=np.float64)
        self._max_age_s = max_age_s
        self._clock = clock
        self._start = 0
        self._count = 0
        self._sum = 0.0
        self._written = 0  # values added since the sum was last rebuilt

    def add(self, values: np.ndarray) -> float:
        """Append `values` (the newest last), stamped now, and return the window's mean."""
        now = self._clock()
        size = len(self._values)
        values = np.asarray(values, dtype=np.float64)[-size:]
        self._drop_oldest(self._count + len(values) - size)
        positions = (self._start + self._count + np.arange(len(values))) % size
        self._values[positions] = values
        self._times[positions] = now
        self._count += len(values)
        # a running sum keeps this O(batch), not O(window); it is rebuilt once per window's
        # worth of writes (amortised O(1) per value) so float error cannot accumulate
        self._written += len(values)
        if self._written >= size:
            self._written = 0
            self._sum = float(self._values[self._positions()].sum())
        else:
            self._sum += float(values.sum())
        return self.mean()

    def mean(self) -> float:
        """The mean over the predictions still in the window (NaN when there are none)."""
        self._expire()
        return self._sum / self._count if self._count else float("nan")

    def __len__(self) -> int:
        self._expire()
        return self._count

    def _positions(self) -> np.ndarray:
        return (self._start + np.arange(self._count)) % len(self._values)

    def _drop_oldest(self, n: int) -> None:
        if n <= 0:
            return
        n = min(n, self._count)
        dropped = (self._start + np.arange(n)) % len(self._values)
        self._sum -= float(self._values[dropped].sum())
        self._start = (self._start + n) % len(self._values)
        self._count -= n
        if self._count == 0:
            self._sum = 0.0

    def _expire(self) -> None:
        """Drop the predictions older than `max_age_s`: times grow from the oldest on."""
        if not self._count or math.isinf(self._max_age_s):
            return
        cutoff = self._clock() - self._max_age_s
        stale = int(np.searchsorted(self._times[self._positions()], cutoff, side="left"))
        self._drop_oldest(stale)
