"""Reading score tables: one score per patch position from the full-coverage oracle's rows."""

import numpy as np
import pyarrow as pa

from ltrp.data.tables import position_scores


def test_position_scores_rank_normalise_each_row_then_average_per_position() -> None:
    table = pa.table(
        {
            "image_id": ["a", "a", "a", "b"],
            "visible": [[0, 1, 2], [3, 4, 5], [0, 3, 5], [1, 2, 3]],
            # row 1's scale is 1000x row 0's: ranks, not raw values, are averaged
            "scores": [[0.1, 0.3, 0.2], [300.0, 100.0, 200.0], [5.0, 5.0, 9.0], [1.0, 2.0, 3.0]],
        }
    )
    out = position_scores(table, num_patches=7)
    # a: row 0 ranks -> [0, 1, .5] at 0,1,2; row 1 -> [1, 0, .5] at 3,4,5; row 2 (a tie) -> [.25, .25, 1]
    expected_a = np.array([(0 + 0.25) / 2, 1, 0.5, (1 + 0.25) / 2, 0, (0.5 + 1) / 2, np.nan])
    np.testing.assert_allclose(out["a"], expected_a)
    np.testing.assert_allclose(out["b"], [np.nan, 0, 0.5, 1, np.nan, np.nan, np.nan])
    assert set(out) == {"a", "b"}
