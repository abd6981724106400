"""The ranking job's worker side: each image's rows (its views) and the ranking stage.

No MLflow, no job module: the decode and ranking workers import only this, `shards` and `stages`.
"""

from __future__ import annotations

import pyarrow as pa
import torch

from ltrp.data.sources import SourceImage
from ltrp.pipeline.configs import RankConfig
from ltrp.pipeline.shards import usable_images, view_rows


def image_rows(image: SourceImage, cfg: RankConfig, size: int) -> list[dict]:
    """The decode stage's rows of one image: its views."""
    return view_rows(image, range(cfg.views), cfg, size)


class ShardRanker:
    """Ranking stage: an actor holding the ranker on its device; rows with pixels -> rows with the
    ranker's scores (fp16) and positions in ranked order (int16). The ranker travels as weights and
    geometry, not as the registry's artifact: every actor checks the weights' digest."""

    def __init__(self, ranker_config: dict, weights: dict, sha256: str, rounds: int, gpu: bool) -> None:
        # Here, not at the top: the decode workers import this module for `image_rows`, and the ranker's
        # modules (timm, torchvision) would add ~2.4 CPU-s to every decode worker's start.
        from ltrp.core.ranker import Ranker, RankerConfig, rank
        from ltrp.data.checkpoints import weights_sha256

        self.rank = rank
        self.device = torch.device("cuda" if gpu else "cpu")
        ranker = Ranker(RankerConfig(**ranker_config))
        ranker.load_state_dict(weights)  # strict: the geometry and the weights must agree
        if weights_sha256(ranker) != sha256:
            raise RuntimeError(f"the ranker's weights arrived changed (sha256 is not {sha256[:12]}...)")
        self.ranker, self.rounds = ranker.to(self.device).eval(), rounds

    @torch.inference_mode()
    def __call__(self, batch: pa.Table) -> pa.Table:
        ok, images = usable_images(batch, self.ranker.cfg.img_size, self.device)
        scores: list[list[float] | None] = [None] * batch.num_rows
        order: list[list[int] | None] = [None] * batch.num_rows
        if len(ok):
            values = self.rank(self.ranker, images, self.rounds).float()  # (B, L)
            ranked = values.argsort(dim=1, descending=True, stable=True)
            for i, row, positions in zip(ok, values.cpu().tolist(), ranked.cpu().tolist(), strict=True):
                scores[i], order[i] = row, positions
        return (
            batch.drop_columns(["pixels"])
            .append_column("scores", pa.array(scores, pa.list_(pa.float16())))
            .append_column("order", pa.array(order, pa.list_(pa.int16())))
        )
