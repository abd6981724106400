"""The scoring job's worker side: each image's rows (its views and visible sets) and the scoring stage.

No MLflow, no job module: the decode and scoring workers import only this, `shards` and `stages`; the
MAE's modules load in the scoring actors only.
"""

from __future__ import annotations

import math

import pyarrow as pa
import torch

from ltrp.core.masking import cover_sets, visible_count, visible_sets
from ltrp.data.sources import SourceImage
from ltrp.data.tables import SCORES_SCHEMA
from ltrp.pipeline.configs import ScoreConfig
from ltrp.pipeline.shards import usable_images, view_rows

#: What the decode stage adds to each row: the visible set to score.
COLUMNS = (SCORES_SCHEMA.field("visible"),)


def rows_per_image(cfg: ScoreConfig, grid: int) -> int:
    """Rows the table holds per image: its views, or the cover sets of its one view."""
    if cfg.cover:
        return cfg.cover * math.ceil(grid * grid / visible_count(grid * grid, cfg.mask_ratio))
    return cfg.views


def image_rows(image: SourceImage, cfg: ScoreConfig, size: int, grid: int) -> list[dict]:
    """The decode stage's rows of one image: its views, each with its visible set. Cover mode scores
    many visible sets of view 0: a row's "view" then numbers its set."""
    sets = _visible_sets(image.image_id, cfg, grid)
    rows = view_rows(image, [0] * len(sets) if cfg.cover else range(cfg.views), cfg, size)
    return [{**row, "visible": visible.tolist()} for row, visible in zip(rows, sets, strict=True)]


def _visible_sets(image_id: str, cfg: ScoreConfig, grid: int) -> torch.Tensor:
    """(rows, n): one visible set per view, or the full-coverage oracle's sets (`cfg.cover` rounds)."""
    if cfg.cover:
        return cover_sets(image_id, grid=grid, mask_ratio=cfg.mask_ratio, seed=cfg.seed, rounds=cfg.cover)
    return torch.cat(
        [
            visible_sets([image_id], grid=grid, mask_ratio=cfg.mask_ratio, seed=cfg.seed, view=v)
            for v in range(cfg.views)
        ]
    )


class ShardScorer:
    """Scoring stage: an actor holding the MAE on its device; rows with pixels -> rows with scores."""

    def __init__(self, cfg: ScoreConfig, sha256: str, gpu: bool) -> None:
        # Here, not at the top: the decode workers import this module for `image_rows`, and the MAE's
        # modules (timm, torchvision) would add ~2.4 CPU-s to every decode worker's start.
        from ltrp.core.leave_one_out import AUTOCAST_DTYPES, loo_scores
        from ltrp.data.checkpoints import load_mae

        self.loo_scores, self.autocast_dtype = loo_scores, AUTOCAST_DTYPES[cfg.precision]
        self.device = torch.device("cuda" if gpu else "cpu")
        self.mae = load_mae(cfg.mae).to(self.device)
        if self.mae.checkpoint.sha256 != sha256:
            raise RuntimeError(f"{cfg.mae} changed since the job started (sha256 {sha256[:12]}...)")
        self.cfg = cfg

    def __call__(self, batch: pa.Table) -> pa.Table:
        ok, images = usable_images(batch, self.mae.cfg.img_size, self.device)
        scores: list[list[float] | None] = [None] * batch.num_rows
        if len(ok):
            visible = torch.tensor(batch.column("visible").take(ok).to_pylist(), device=self.device)
            values = self.loo_scores(
                self.mae,
                images,
                visible,
                mode=self.cfg.mode,
                metric=self.cfg.metric,
                autocast_dtype=self.autocast_dtype,
            )
            for i, row in zip(ok, values.cpu().tolist(), strict=True):
                scores[i] = row
        return batch.drop_columns(["pixels"]).append_column(
            "scores", pa.array(scores, pa.list_(pa.float32()))
        )
