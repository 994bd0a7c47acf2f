"""The margin cache: chunks keep the closest adversarial inputs, and a chunk of an older format
lives under another key, so it is recomputed rather than misread."""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from marginwatch.calibration import margin_cache
from marginwatch.calibration.margin_cache import AttackPlan, cache_key, compute_chunks, load_chunks

pytestmark = pytest.mark.usefixtures("seeded_one_thread")


def test_chunks_round_trip_the_adversarial_inputs(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    inputs = torch.rand(margin_cache.CHUNK_SIZE + 7, 1, 4, 4)
    labels = model(inputs).argmax(1)
    plan = AttackPlan(("fmn",), (20,), math.inf)
    chunks = list(range(margin_cache.chunk_count(len(inputs))))
    compute_chunks(tmp_path, model, inputs, labels, plan=plan, chunks=chunks, batch_size=32,
                   progress=False)  # fmt: skip
    result = load_chunks(tmp_path, len(inputs), plan)
    assert result.adv_inputs is not None and result.adv_inputs.shape == inputs.shape
    assert result.success.any()
    found = torch.tensor(result.success)
    adv = torch.tensor(result.adv_inputs)[found]
    # the stored points are the confirmed ones: they flip the label at the recorded radius
    assert (model(adv).argmax(1) != labels[found]).all()
    distance = (adv - inputs[found]).flatten(1).abs().amax(1).double()
    np.testing.assert_allclose(distance.numpy(), result.radius[result.success], rtol=1e-5)


def test_the_cache_format_is_part_of_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    plan = AttackPlan(("fmn",), (100,), math.inf)
    indices = np.arange(10)
    current = cache_key("model", "data", indices, plan)
    monkeypatch.setattr(margin_cache, "CACHE_FORMAT", margin_cache.CACHE_FORMAT - 1)
    assert cache_key("model", "data", indices, plan) != current


def test_one_bar_counts_the_points_of_every_chunk(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    inputs = torch.rand(2 * margin_cache.CHUNK_SIZE + 7, 1, 4, 4)
    labels = model(inputs).argmax(1)
    plan = AttackPlan(("fmn", "fab"), (5, 3), math.inf)
    chunks = list(range(margin_cache.chunk_count(len(inputs))))
    attack = functools.partial(
        compute_chunks, tmp_path, model, inputs, labels,
        plan=plan, batch_size=32, progress=True, phase="subset margins",
    )  # fmt: skip
    attack(chunks=chunks[:1])
    capsys.readouterr()
    attack(chunks=chunks)
    err = capsys.readouterr().err
    # one bar over all chunks and attacks, in points; the cached first chunk counts as done
    states = re.findall(r"subset margins: +\d+%\|[^|]*\| (\d+)/(\d+)", err)
    total = str(len(inputs))
    assert states and {t for _, t in states} == {total}, err
    assert states[0][0] == str(margin_cache.CHUNK_SIZE) and states[-1][0] == total, err
