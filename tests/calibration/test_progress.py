"""Progress: one named bar per phase, counting points, epochs or resamples (not chunks), on
stderr; none with --quiet."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from marginwatch.calibration.__main__ import main
from marginwatch.calibration.progress import phase
from marginwatch.models.data import Dataset, save_npz

SUBSET, TRAIN, EPOCHS, BOOTSTRAP = 20, 60, 30, 20
TINY = [
    "--subset-size", str(SUBSET), "--seed", "0", "--attack", "fmn:5", "--attack", "fab:3",
    "--bootstrap", str(BOOTSTRAP), "--pseudo-margin", "always",
    "--pseudo-train-size", str(TRAIN), "--pseudo-epochs", str(EPOCHS),
]  # fmt: skip
# Each phase's bar and where it must end: the points of every chunk and attack, epochs, and
# resamples (two candidates of the score choice, then the two estimators and the estimate at each
# other budget of the default grid: ε/4, ε/2, 2ε).
FINAL = {
    "subset margins": SUBSET,
    "training-point margins": TRAIN,
    "pseudo-margin training": EPOCHS,
    "score-choice bootstrap": 2 * BOOTSTRAP,
    "bootstrap": (2 + 3) * BOOTSTRAP,
}
BAR = re.compile(r"(?:^|[\r\n])([a-z -]+): +(\d+)%\|[^|]*\| (\d+)/(\d+)")


def bars(stderr: str) -> dict[str, list[tuple[int, int]]]:
    """Every state each named bar was drawn in, as (done, total)."""
    found: dict[str, list[tuple[int, int]]] = {}
    for name, _, done, total in BAR.findall(stderr):
        found.setdefault(name, []).append((int(done), int(total)))
    return found


@pytest.fixture(scope="module")
def data_npz(tmp_path_factory: pytest.TempPathFactory, fashion_subset: Dataset) -> Path:
    path = tmp_path_factory.mktemp("data") / "fmnist-300.npz"
    save_npz(fashion_subset.subset(np.arange(300)), path)
    return path


@pytest.mark.slow
def test_a_run_shows_one_bar_per_phase(
    tmp_path: Path, data_npz: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--store", str(tmp_path), "--dataset", str(data_npz), *TINY]) == 0
    drawn = bars(capsys.readouterr().err)
    assert set(drawn) == set(FINAL), drawn.keys()
    for name, total in FINAL.items():
        # one bar per phase: every state of it counts towards the same total, and it ends full
        assert {t for _, t in drawn[name]} == {total}, (name, drawn[name])
        assert drawn[name][-1] == (total, total), (name, drawn[name])
    assert not any((1, 1) in states or (0, 1) in states for states in drawn.values())


@pytest.mark.slow
def test_quiet_shows_no_bar(
    tmp_path: Path, data_npz: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--store", str(tmp_path), "--dataset", str(data_npz), *TINY, "--quiet"]) == 0
    err = capsys.readouterr().err
    assert not bars(err) and "%|" not in err, err


def test_a_phase_counts_what_it_is_given(capsys: pytest.CaptureFixture[str]) -> None:
    with phase("resamples", 7, enabled=True, unit="resample") as advance:
        for _ in range(7):
            advance(1)
    assert bars(capsys.readouterr().err)["resamples"][-1] == (7, 7)
    with phase("cached", 5, enabled=True, done=5) as advance:  # nothing left: no 5/5 bar
        advance(0)
    with phase("quiet", 5, enabled=False) as advance:
        advance(5)
    assert capsys.readouterr().err == ""
