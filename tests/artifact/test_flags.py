"""The one flag rule (`artifact.flags`): brittle is score < λ strictly, borderline |score − λ| ≤
band, several λ give one column each, float32 scores are compared without rounding λ, and the
numpy guarded score is the exported graph's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from marginwatch.artifact.flags import (
    borderline,
    brittle,
    brittle_counts,
    guarded_score_np,
    operating_thresholds,
)
from marginwatch.calibration.scores import (
    guarded_score,
    logit_margin,
)

SCORES = np.array([0.5, 1.0, 1.0, 2.0, 3.5])


def test_brittle_is_strictly_below_lambda_and_a_tie_is_not() -> None:
    np.testing.assert_array_equal(brittle(SCORES, 1.0), [True, False, False, False, False])
    np.testing.assert_array_equal(brittle(SCORES, 1.5), [True, True, True, False, False])
    assert not brittle(SCORES, SCORES.min()).any() and brittle(SCORES, np.inf).all()
    assert brittle(SCORES, 1.0).shape == SCORES.shape and brittle(SCORES, 1.0).dtype == np.bool_


def test_several_lambdas_give_one_flag_column_each() -> None:
    thresholds = np.array([0.5, 1.0, 1.5, 4.0])
    flags = brittle(SCORES, thresholds)
    assert flags.shape == (SCORES.size, thresholds.size)
    for j, threshold in enumerate(thresholds):
        np.testing.assert_array_equal(flags[:, j], brittle(SCORES, float(threshold)))
    np.testing.assert_array_equal(brittle_counts(SCORES, thresholds), flags.sum(axis=0))
    np.testing.assert_array_equal(brittle_counts(SCORES, thresholds), [0, 1, 3, 5])
    np.testing.assert_array_equal(brittle(SCORES, [1.0]), brittle(SCORES, 1.0)[:, None])


def test_borderline_includes_the_band_edges_and_takes_several_lambdas() -> None:
    np.testing.assert_array_equal(borderline(SCORES, 1.5, 0.5), [False, True, True, True, False])
    np.testing.assert_array_equal(
        borderline(SCORES, [1.5, 3.0], 0.5),
        np.column_stack([borderline(SCORES, 1.5, 0.5), borderline(SCORES, 3.0, 0.5)]),
    )
    assert borderline(SCORES, 2.0, 0.0).tolist() == [False, False, False, True, False]


def test_float32_scores_meet_lambda_in_float64() -> None:
    """The rules fit λ in float64 between float32 scores; a λ rounded to float32 could equal the
    score below it (adjacent float32s have no float32 between them) and unflag it."""
    low = np.float32(1.0)
    high = np.nextafter(low, np.float32(2.0))
    scores = np.array([low, high], dtype=np.float32)
    midpoint = float(low) + (float(high) - float(low)) / 2
    assert np.float32(midpoint) == low  # the rounding the rule must not do
    np.testing.assert_array_equal(brittle(scores, midpoint), [True, False])
    above = float(np.nextafter(np.float64(high), np.inf))  # λ flagging every point
    assert brittle(scores, above).all() and brittle(scores, [midpoint, above]).sum() == 3


def test_operating_thresholds_give_every_distinct_flag_set_once() -> None:
    thresholds = operating_thresholds(SCORES)
    np.testing.assert_array_equal(thresholds, [0.5, 1.0, 2.0, 3.5, np.inf])
    counts = brittle_counts(SCORES, thresholds)
    np.testing.assert_array_equal(counts, [0, 1, 3, 4, 5])  # the tie at 1.0 enters together
    sets = {tuple(column) for column in brittle(SCORES, thresholds).T}
    assert len(sets) == thresholds.size


@pytest.mark.parametrize("bad", [np.zeros((2, 2)), [[1.0]]])
def test_a_threshold_of_two_dimensions_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="1-d array of λs"):
        brittle(SCORES, bad)  # type: ignore[arg-type]


def test_a_nan_threshold_cannot_be_counted() -> None:
    assert not brittle(SCORES, np.nan).any()
    with pytest.raises(ValueError, match="nan"):
        brittle_counts(SCORES, [1.0, np.nan])


def test_guarded_score_numpy_equals_torch_exactly() -> None:
    generator = torch.Generator().manual_seed(0)
    pseudo = torch.randn(500, generator=generator)
    logits = torch.randn(500, 10, generator=generator) * 4
    for kappa in (0.3, 1.0, 7.25):
        expected = guarded_score(pseudo, logits, kappa).numpy()
        got = guarded_score_np(pseudo.numpy(), logit_margin(logits).numpy(), kappa)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, expected)
