"""Shared fixtures: the shipped test subset and small, fast helpers."""

from __future__ import annotations

import pytest

from marginwatch.models.data import Dataset, load_dataset


@pytest.fixture(scope="session")
def fashion_subset() -> Dataset:
    return load_dataset("fashion-mnist-subset", "test")
