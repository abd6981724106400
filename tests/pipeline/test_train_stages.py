"""The training job's data stages as plain functions, without Ray: which views train and which validate,
how the views are replayed, and what a training name stands for."""

import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from support import write_table

from jobs.bench.jpegs import imagenet_sized_jpegs
from ltrp.data.images import View, displayed_size, render_view, view_geometry
from ltrp.data.sources import read_many
from ltrp.data.tables import SCORES_SCHEMA
from ltrp.pipeline import training_data
from ltrp.pipeline.configs import InputError, TrainConfig
from ltrp.pipeline.train_job import ranker_config
from ltrp.pipeline.trainer import claimed
from ltrp.pipeline.training_data import is_validation, load_views, select_split, split_counts
from ltrp.pipeline.training_loop import Best, TrainerConfig


def _rows(images: int, views: int) -> list[dict]:
    return [
        {"image_id": f"img{i:03d}", "uri": "u", "label": None, "view": v, "crop_box": [0, 0, 1, 1],
         "flip": False, "visible": [0], "scores": [0.0]}
        for i in range(images) for v in range(views)
    ]  # fmt: skip


@pytest.mark.parametrize("views", [None, 1, 3])
def test_a_split_keeps_its_side_and_the_first_views_only(views: int | None) -> None:
    batch = pa.Table.from_pylist(_rows(40, 4), schema=SCORES_SCHEMA)
    train = select_split(batch, 0.25, validation=False, views=views)
    val = select_split(batch, 0.25, validation=True, views=views)
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


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_training_name_stands_for_one_set_of_inputs(where: str, tmp_path: Path, request) -> None:
    storage = str(tmp_path / "ckpt") if where == "local" else request.getfixturevalue("s3_bucket") + "/ckpt"
    inputs = {
        "scores": "s3://b/scores/run1",
        "score_table": {"plan_digest": "ab12"},
        "ranker": "r",
        "seed": 0,
        "taus": (0.005, 0.01),  # a tuple option: its record reads back as a list
    }
    with claimed(storage, "run1", "jobs.train", inputs):  # the first launch records them
        pass
    with claimed(storage, "run1", "jobs.train", dict(inputs)):  # a re-launch on the same inputs resumes
        pass
    with claimed(storage, "run2", "jobs.train", {**inputs, "seed": 1}):  # another name: another training
        pass
    other = {**inputs, "scores": "s3://b/scores/run2", "score_table": {"plan_digest": "cd34"}}
    with (
        pytest.raises(
            InputError,
            match=r"--name run1 holds a training of other inputs \(differs in: score_table, scores;",
        ),
        claimed(storage, "run1", "jobs.train", other),
    ):
        pass


@pytest.mark.parametrize("order", ["as stored", "shuffled"])
def test_load_views_replays_each_stored_view_with_one_read_per_image(
    tmp_path: Path, order: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows of 3 JPEGs x 4 random views (crops at different JPEG reductions, flips), in table order or
    shuffled: each row gets the pixels `render_view` gives its view alone, and each image is read once."""
    photos = imagenet_sized_jpegs(3, ("astronaut", "coffee", "chelsea"), seed=0)
    rows = []
    for i, data in enumerate(photos):
        path = tmp_path / f"{i}.jpg"
        path.write_bytes(data)
        width, height = displayed_size(data)
        for v in range(4):
            view = view_geometry(str(i), v, width, height, crop="random", flip=True)
            box = list(view.box)
            rows.append({"image_id": str(i), "uri": str(path), "label": None, "view": v, "crop_box": box,
                         "flip": view.flip, "visible": [0], "scores": [0.0]})  # fmt: skip
    if order == "shuffled":
        random.Random(0).shuffle(rows)
    reads = []
    monkeypatch.setattr(training_data, "read_many", lambda uris: reads.extend(uris) or read_many(uris))
    loaded = load_views(pa.Table.from_pylist(rows, schema=SCORES_SCHEMA), 64)
    assert sorted(reads) == sorted({r["uri"] for r in rows})
    expected = [
        render_view(Path(r["uri"]).read_bytes(), View(tuple(r["crop_box"]), r["flip"]), 64) for r in rows
    ]
    np.testing.assert_array_equal(loaded["image"], np.stack(expected))


def test_early_stopping_keeps_the_first_best_and_counts_validations_since() -> None:
    best = Best()
    for epoch, tau in enumerate([0.2, 0.3, 0.3, 0.25, 0.31, 0.1]):
        best = best.after(epoch, tau)
        if epoch == 3:  # 0.3 at epoch 1; epoch 2 only equals it
            assert (best.epoch, best.value, best.stale) == (1, 0.3, 2)
    assert (best.epoch, best.value, best.stale) == (4, 0.31, 1)


@pytest.mark.parametrize(("every", "validated"), [(1, [0, 1, 2, 3, 4]), (2, [1, 3, 4]), (10, [4])])
def test_validation_every_n_epochs_and_after_the_last(every: int, validated: list[int]) -> None:
    cfg = TrainerConfig(
        name="n", storage="s", workers=1, worker_cpus=1, use_gpu=False, max_failures=0, epochs=5,
        warmup_epochs=0, steps_per_epoch=1, lr=1e-3, weight_decay=0, seed=0, validate_every=every,
        keep_checkpoints=1,
    )  # fmt: skip
    assert [e for e in range(5) if cfg.validates(e)] == validated


@pytest.mark.parametrize(("training", "set_size"), [("asymmetric", 16), ("symmetric", None)])
def test_a_ranker_trained_on_the_scored_patches_ranks_in_sets_of_their_count(
    training: str, set_size: int | None
) -> None:
    """The table's n (64 patches at mask ratio 0.75: 16) is what an asymmetric ranker learned to order,
    so it ranks in sets of n; a symmetric one learned from every patch, and ranks seeing them all."""
    cfg = TrainConfig(scores="s", ranker="ltrp_vit_micro_patch8", training=training)
    assert ranker_config(cfg, {"mask_ratio": 0.75}).set_size == set_size
