"""Agreement with the full-coverage oracle, on hand-made score tables."""

import numpy as np
import pyarrow as pa
import pytest

from ltrp.evaluation import fidelity


def _table(rows: list[tuple[str, int, list[int], list[float]]]) -> pa.Table:
    ids, views, visible, scores = zip(*rows, strict=True)
    return pa.table({"image_id": ids, "view": views, "visible": visible, "scores": scores})


# Two rounds of 2 sets of 2 over L = 4 positions, for one image.
COVER = _table(
    [
        ("a", 0, [0, 1], [1.0, 2.0]),
        ("a", 1, [2, 3], [3.0, 4.0]),
        ("a", 2, [0, 2], [9.0, 1.0]),
        ("a", 3, [1, 3], [9.0, 1.0]),
    ]
)


def test_the_oracle_averages_rank_normalised_rows_per_position() -> None:
    np.testing.assert_allclose(fidelity.oracle(COVER, 4, ["a"]), [[0.5, 1, 0, 0.5]])  # the halves' mean


def test_split_half_oracles_come_from_disjoint_rounds() -> None:
    first, second = fidelity.split_half_oracles(COVER, 4, ["a"], sets_per_round=2)
    np.testing.assert_allclose(first, [[0, 1, 0, 1]])
    np.testing.assert_allclose(second, [[1, 1, 0, 0]])
    with pytest.raises(ValueError, match="at least 2 rounds"):
        fidelity.split_half_oracles(COVER.slice(0, 2), 4, ["a"], sets_per_round=2)


def test_rounds_sets_per_round_and_the_spearman_brown_prediction() -> None:
    assert fidelity.sets_per_round(COVER, 4) == 2
    assert fidelity.sets_per_round(COVER, 5) == 3  # the last set topped up
    assert fidelity.cover_rounds(COVER, 2) == 2 and fidelity.cover_rounds(COVER.slice(0, 2), 2) == 1
    assert fidelity.spearman_brown(0.5) == pytest.approx(2 / 3)
    assert fidelity.spearman_brown(0.5, factor=3) == pytest.approx(0.75)
    assert fidelity.spearman_brown(1.0) == pytest.approx(1.0)
    assert np.isnan(fidelity.spearman_brown(-1.0))


def test_an_image_not_fully_covered_is_refused() -> None:
    with pytest.raises(ValueError, match="lack a score"):
        fidelity.oracle(COVER.slice(0, 1), 4, ["a"])


def test_tau_at_positions_and_draw_rows() -> None:
    reference = np.array([[0.0, 1.0, 2.0, 3.0], [3.0, 2.0, 1.0, 0.0]])
    positions = np.array([[0, 3], [1, 2]])
    assert fidelity.at_positions(reference, positions).tolist() == [[0.0, 3.0], [2.0, 1.0]]
    np.testing.assert_allclose(fidelity.tau(reference, reference), [1, 1])
    np.testing.assert_allclose(fidelity.tau(reference, reference[::-1].copy()), [-1, -1])
    draws = _table([("b", 0, [1, 2], [0.1, 0.2]), ("a", 1, [0, 1], [5.0, 6.0]), ("a", 0, [2, 3], [7.0, 8.0])])
    visible, scores = fidelity.draw_rows(draws, ["a", "b"])
    assert visible.tolist() == [[2, 3], [1, 2]] and scores.tolist() == [[7.0, 8.0], [0.1, 0.2]]
