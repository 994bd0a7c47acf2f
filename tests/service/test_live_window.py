"""The live robust-accuracy window: a rolling mean over the most recent predictions."""

from __future__ import annotations

import numpy as np
import pytest

from marginwatch.service.live_window import LiveWindow


def test_live_window_is_a_rolling_mean() -> None:
    window = LiveWindow(4)
    assert np.isnan(window.mean()) and len(window) == 0
    assert window.add(np.array([1.0, 1.0])) == 1.0
    assert window.add(np.array([0.0, 0.0, 0.0])) == 0.25  # holds 1, 0, 0, 0
    assert window.add(np.arange(10, dtype=float)) == 7.5  # the last four: 6..9
    assert len(window) == 4


def test_live_window_running_sum_stays_exact_over_many_wraps() -> None:
    rng = np.random.default_rng(0)
    window = LiveWindow(7)
    values = rng.random(1000)
    for start in range(0, len(values), 3):
        mean = window.add(values[start : start + 3])
    assert mean == pytest.approx(values[-7:].mean(), abs=1e-12)
