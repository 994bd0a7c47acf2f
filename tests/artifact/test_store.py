"""The store's version ids: unique for back-to-back runs of one model, whatever the clock."""

from __future__ import annotations

from pathlib import Path

from marginwatch.artifact import store

NOON = 1_796_558_400.0  # a fixed instant: every run of the test lands on the same millisecond


def test_version_ids_from_one_millisecond_are_unique_and_sorted(tmp_path: Path) -> None:
    ids = []
    for _ in range(12):
        version = store.new_version_id(tmp_path, "m", clock=lambda: NOON)
        (tmp_path / "m" / version).mkdir(parents=True)
        ids.append(version)
    assert len(set(ids)) == 12
    assert ids == sorted(ids)
    assert ids[0] == "20261206T120000.000Z" and ids[1] == "20261206T120000.000Z-002"


def test_version_ids_follow_the_clock(tmp_path: Path) -> None:
    ticks = iter([NOON, NOON + 0.0004, NOON + 0.2, NOON + 1.0])
    ids = [store.new_version_id(tmp_path, "m", clock=lambda: next(ticks)) for _ in range(4)]
    assert ids == sorted(ids)
    assert ids[2] == "20261206T120000.200Z" and ids[3] == "20261206T120001.000Z"


def test_a_staged_version_is_taken(tmp_path: Path) -> None:
    (tmp_path / "m" / f"{store.STAGING_PREFIX}20261206T120000.000Z").mkdir(parents=True)
    assert store.new_version_id(tmp_path, "m", clock=lambda: NOON).endswith("-002")
