"""The scoring job: an image corpus -> leave-one-out MAE pseudo-scores as Parquet, on the corpus-job frame.

Stages: the corpus's shards -> CPU decode tasks (bytes -> views as uint8 pixels, each with its visible
set) -> a pool of scoring actors (one per GPU, or CPU actors; an autoscaling cluster may grow it) ->
commit tasks (`ltrp.pipeline.corpus_job`, `shards`). The table's rows: `ltrp.data.tables.SCORES_SCHEMA`,
under OUTPUT/scores/.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from typing import Any

from ltrp.core.mae import MAE
from ltrp.data.checkpoints import load_mae
from ltrp.data.tables import SCORES, SCORES_SCHEMA
from ltrp.pipeline import corpus_job, score_stages
from ltrp.pipeline.configs import ScoreConfig
from ltrp.pipeline.stages import Stage


class ScoreJob(corpus_job.CorpusJob[ScoreConfig]):
    """A scoring job, checked and planned (refusing a missing, encoder-only or mis-shaped MAE)."""

    name, verb, table, schema = "score", "scored", SCORES, SCORES_SCHEMA
    columns = score_stages.COLUMNS
    model: MAE

    def load(self) -> MAE:
        return load_mae(self.cfg.mae)

    def model_keys(self) -> dict[str, Any]:
        """The MAE's bytes and geometry and, in encoder mode, what v's decoder slot holds."""
        keys = {"mae_sha256": self.model.checkpoint.sha256, "mae_config": asdict(self.model.cfg)}
        if self.cfg.mode == "encoder":
            # Encoder mode once dropped v's decoder slot; now the slot holds the mask token. Tables of the
            # old kind lack this key, so they are neither resumed nor mixed (decoder mode is unchanged).
            keys["encoder_slot"] = "mask_token"
        return keys

    def details(self) -> dict[str, Any]:
        checkpoint = self.model.checkpoint
        return {
            "mae_uri": checkpoint.uri,
            "mae_format": checkpoint.format,
            "norm_pix": self.model.cfg.norm_pix,
        }

    def tags(self) -> dict[str, str]:
        return {"mae_uri": self.model.checkpoint.uri, "mae_sha256": self.model.checkpoint.sha256}

    @property
    def size(self) -> int:
        return self.model.cfg.img_size

    def rows_per_image(self) -> int:
        return score_stages.rows_per_image(self.cfg, self.model.cfg.grid)

    def image_rows(self) -> Callable:
        return partial(score_stages.image_rows, cfg=self.cfg, size=self.size, grid=self.model.cfg.grid)

    def model_stage(self, gpu: bool) -> Stage:
        cfg = self.cfg
        return Stage(
            score_stages.ShardScorer,
            batch_size=cfg.batch_size,
            kwargs={"cfg": cfg, "sha256": self.model.checkpoint.sha256, "gpu": gpu},
            **self.actor_resources(gpu),
        )


def run(cfg: ScoreConfig, progress: Callable[[str], None] = print) -> corpus_job.CorpusSummary:
    """The scoring job as `python -m jobs.score` runs it: on Ray, inside an MLflow run (ltrp-score)."""
    return corpus_job.run(ScoreJob, cfg, progress)
