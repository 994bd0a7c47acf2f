from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def seeded_one_thread() -> Iterator[None]:
    """Tiny models: extra threads only contend with whatever else runs on the machine. Seeded
    because DDN, like adv_lib's, steps in a random direction where its gradient vanishes, and
    the global generator's state would otherwise depend on which tests ran before."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
