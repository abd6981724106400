"""The training job's data stages as plain functions, without Ray: which views train and which validate."""

from pathlib import Path

import pyarrow as pa
import pytest
from conftest import write_table

from ltrp.data.tables import SCORES_SCHEMA
from ltrp.pipeline.configs import TrainConfig
from ltrp.pipeline.train_job import _select_split, is_validation, split_counts


def _rows(images: int, views: int) -> list[dict]:
    return [
        {"image_id": f"img{i:03d}", "uri": "u", "label": None, "view": v, "crop_box": [0, 0, 1, 1],
         "flip": False, "visible": [0], "scores": [0.0]}
        for i in range(images) for v in range(views)
    ]  # fmt: skip


@pytest.mark.parametrize("views", [None, 1, 3])
def test_a_split_keeps_its_side_and_the_first_views_only(views: int | None) -> None:
    batch = pa.Table.from_pylist(_rows(40, 4), schema=SCORES_SCHEMA)
    train = _select_split(batch, 0.25, validation=False, views=views)
    val = _select_split(batch, 0.25, validation=True, views=views)
    kept = 4 if views is None else views
    assert train.num_rows + val.num_rows == 40 * kept
    assert set(train.column("view").to_pylist()) == set(range(kept)) == set(val.column("view").to_pylist())
    assert not any(is_validation(i, 0.25) for i in train.column("image_id").to_pylist())
    assert all(is_validation(i, 0.25) for i in val.column("image_id").to_pylist())


def test_split_counts_count_the_views_trained_on(tmp_path: Path) -> None:
    table = write_table(tmp_path / "t", _rows(40, 4))
    full = split_counts(TrainConfig(scores=str(table), val_fraction=0.25))
    two = split_counts(TrainConfig(scores=str(table), val_fraction=0.25, views=2))
    assert sum(full) == 160 and sum(two) == 80 and full == (two[0] * 2, two[1] * 2)
