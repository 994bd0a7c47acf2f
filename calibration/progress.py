"""The calibration job's progress: one bar per phase, named, counting what the phase works
through (points attacked, epochs trained, bootstrap resamples), with tqdm's own rate and ETA, on
stderr so that stdout (`--json`'s record) stays clean.

A phase hands its work an `Advance` (``advance(n)``: n more units done) rather than a bar, so the
numeric code neither imports nor configures tqdm, and a quiet run passes `ignore`. Bars are made
here only, which keeps every phase's bar the same.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tqdm import tqdm

__all__ = ["Advance", "ignore", "phase"]

Advance = Callable[[int], None]
"""Called with how many more units (points, epochs, resamples) are done."""


def ignore(done: int) -> None:
    """The `Advance` of a phase that shows no bar."""


@contextmanager
def phase(
    name: str, total: int, *, enabled: bool, unit: str = "point", done: int = 0
) -> Iterator[Advance]:
    """A bar named `name` counting up to `total` units, `done` of them finished before (say,
    cached chunks); yields its `Advance`. Disabled, or with nothing left to do, no bar at all:
    an empty bar (0/0) tells a person nothing."""
    if not enabled or total <= done:
        yield ignore
        return
    # sys.stderr looked up now, not at import: a caller (or pytest) may have replaced it.
    with tqdm(
        total=total, initial=done, desc=name, unit=unit, file=sys.stderr, dynamic_ncols=True
    ) as bar:
        yield bar.update
