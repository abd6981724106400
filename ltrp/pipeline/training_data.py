"""What the trainings read, as Ray Datasets: ranker training's views of a score table, and MAE
pre-training's image rows.

Ranker training: score rows -> (image, visible, scores) views, split by image id. Validation is the
views of the images whose id hashes into the validation fraction, so the views of an image never
straddle the split. Each view is replayed from its image with the scoring job's own `render_views`.
Pre-training: read tasks -> one row per image, its bytes or why they could not be read.

Light on purpose: every Ray Data process of a training (split coordinators, read and map tasks)
imports this module to run its stages (Ray pickles them by reference). When they lived in the job
modules (MLflow, the registry, timm), each such process took ~13 s of CPU to start on a 2-core
machine; this module takes under half of that.
"""

from __future__ import annotations

import hashlib
import itertools

import numpy as np
import pyarrow as pa
import ray.data

from ltrp.data.images import View, render_views
from ltrp.data.sources import Shard, read_many, read_shard
from ltrp.data.tables import SCORES_SCHEMA, arrow_filesystem, read_scores
from ltrp.pipeline.configs import TrainConfig

IMAGES_SCHEMA = pa.schema(
    [("image_id", pa.string()), ("uri", pa.string()), ("data", pa.binary()), ("error", pa.string())]
)


def is_validation(image_id: str, fraction: float) -> bool:
    """A pure function of the image id, so every view of an image lands on the same side."""
    digest = hashlib.shake_256(f"ltrp-split\0{image_id}".encode()).digest(8)
    return int.from_bytes(digest, "little") / 2**64 < fraction


def select_split(batch: pa.Table, fraction: float, validation: bool, views: int | None) -> pa.Table:
    """The rows of `batch` on one side of the split, views 0 .. views - 1 only (all when None)."""
    keep = [is_validation(i, fraction) == validation for i in batch.column("image_id").to_pylist()]
    if views is not None:
        keep = [k and v < views for k, v in zip(keep, batch.column("view").to_pylist(), strict=True)]
    return batch.filter(pa.array(keep, pa.bool_()))


def load_views(batch: pa.Table, size: int) -> dict[str, np.ndarray]:
    """Score rows -> image (B, S, S, 3) uint8, visible (B, n) int64, scores (B, n) float32: each row's
    stored view replayed with the scoring job's own `render_views`, which gives the pixels it scored.
    The rows of an image (its K views lie together in the table) share one read and, where their JPEG
    reductions coincide, one decode."""
    boxes, flips = batch.column("crop_box").to_pylist(), batch.column("flip").to_pylist()
    views = [View(tuple(b), f) for b, f in zip(boxes, flips, strict=True)]
    rows_of: dict[str, list[int]] = {}
    for i, uri in enumerate(batch.column("uri").to_pylist()):
        rows_of.setdefault(uri, []).append(i)
    images: list[np.ndarray] = [np.empty(0, np.uint8)] * batch.num_rows
    for rows, data in zip(rows_of.values(), read_many(list(rows_of)), strict=True):
        for i, pixels in zip(rows, render_views(data, [views[i] for i in rows], size), strict=True):
            images[i] = pixels
    return {
        "image": np.stack(images),
        "visible": np.asarray(batch.column("visible").to_pylist(), dtype=np.int64),
        "scores": np.asarray(batch.column("scores").to_pylist(), dtype=np.float32),
    }


def read_scores_dataset(uri: str) -> ray.data.Dataset:
    """The score table as a Ray Dataset, for distributed consumers such as ranker training."""
    filesystem, path = arrow_filesystem(f"{uri.rstrip('/')}/scores")
    return ray.data.read_parquet(path, filesystem=filesystem, schema=SCORES_SCHEMA)


def views_dataset(cfg: TrainConfig, validation: bool, size: int) -> ray.data.Dataset:
    """The training (or validation) views of `cfg.scores` as `load_views` batches, rendered at `size`."""
    ds = read_scores_dataset(cfg.scores)
    ds = ds.map_batches(
        select_split,
        fn_kwargs={"fraction": cfg.val_fraction, "validation": validation, "views": cfg.views},
        batch_format="pyarrow",
    )
    return ds.map_batches(load_views, fn_kwargs={"size": size}, batch_format="pyarrow")


def split_counts(cfg: TrainConfig) -> tuple[int, int]:
    """(train views, validation views) of the score table, counting views 0 .. cfg.views - 1 only."""
    filters = None if cfg.views is None else [("view", "<", cfg.views)]
    ids = read_scores(cfg.scores, columns=["image_id"], filters=filters).column("image_id").to_pylist()
    val = sum(is_validation(i, cfg.val_fraction) for i in ids)
    return len(ids) - val, val


# -- MAE pre-training ---------------------------------------------------------------------------------
def read_images(batch: dict[str, np.ndarray]) -> pa.Table:
    """Read stage: read tasks -> one row per image: its bytes, or the reason it could not be read."""
    rows = [
        {"image_id": image.image_id, "uri": image.uri, "data": image.data, "error": image.error}
        for text, limit in zip(batch["shard"], batch["limit"], strict=True)
        for image in itertools.islice(read_shard(Shard.from_json(str(text))), int(limit))
    ]
    return pa.Table.from_pylist(rows, schema=IMAGES_SCHEMA)


def images_dataset(reads: list[dict]) -> ray.data.Dataset:
    ds = ray.data.from_items(reads, override_num_blocks=max(1, len(reads)))
    return ds.map_batches(read_images, batch_size=1, batch_format="numpy", num_cpus=1)
