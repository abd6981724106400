"""The ranking job: a trained ranker over an image corpus -> its patch scores and order as Parquet, on
the corpus-job frame.

Stages: the corpus's shards -> CPU decode tasks (bytes -> views as uint8 pixels) -> a pool of ranking
actors (one per GPU, or CPU actors) -> commit tasks (`ltrp.pipeline.corpus_job`, `shards`). The ranker
travels to the actors as weights and geometry: the driver loads it once, records its weights' sha256,
and every actor checks that digest. The table's rows: `ltrp.data.tables.RANKS_SCHEMA`, under
OUTPUT/ranks/; read it with `ltrp.data.tables.read_ranks` and `top_k`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from typing import Any

from mlflow.entities.model_registry import ModelVersion

from ltrp.core.ranker import Ranker
from ltrp.data.checkpoints import weights_sha256
from ltrp.data.tables import RANKS, RANKS_SCHEMA
from ltrp.pipeline import corpus_job, rank_stages
from ltrp.pipeline.configs import RankConfig
from ltrp.pipeline.registry import load_ranker_ref
from ltrp.pipeline.stages import Stage


class RankJob(corpus_job.CorpusJob[RankConfig]):
    """A ranking job, checked and planned (refusing a missing registry version or a file that is not a
    ranker). Its fingerprint holds the ranker's weights and geometry, not where they were loaded from:
    the same version by alias or by number is the same job."""

    name, verb, table, schema = "rank", "ranked", RANKS, RANKS_SCHEMA
    model: tuple[Ranker, ModelVersion | None]

    def load(self) -> tuple[Ranker, ModelVersion | None]:
        return load_ranker_ref(self.cfg.model)

    @property
    def ranker(self) -> Ranker:
        return self.model[0]

    def model_keys(self) -> dict[str, Any]:
        return {"model_sha256": weights_sha256(self.ranker), "ranker_config": asdict(self.ranker.cfg)}

    def details(self) -> dict[str, Any]:
        version = self.model[1]
        return {
            "model_uri": self.cfg.model,
            "model_name": version.name if version else None,
            "model_version": version.version if version else None,
        }

    def tags(self) -> dict[str, str]:
        keys = ("model_uri", "model_name", "model_version", "model_sha256")
        return {k: str(self.metadata[k]) for k in keys}

    @property
    def size(self) -> int:
        return self.ranker.cfg.img_size

    def image_rows(self) -> Callable:
        return partial(rank_stages.image_rows, cfg=self.cfg, size=self.size)

    def model_stage(self, gpu: bool) -> Stage:
        cfg = self.cfg
        return Stage(
            rank_stages.ShardRanker,
            batch_size=cfg.batch_size,
            kwargs={
                "ranker_config": asdict(self.ranker.cfg),
                "weights": self.ranker.state_dict(),
                "sha256": self.metadata["model_sha256"],
                "rounds": cfg.rounds,
                "gpu": gpu,
            },
            **self.actor_resources(gpu),
        )


def run(cfg: RankConfig, progress: Callable[[str], None] = print) -> corpus_job.CorpusSummary:
    """The ranking job as `python -m jobs.rank` runs it: on Ray, inside an MLflow run (ltrp-rank)."""
    return corpus_job.run(RankJob, cfg, progress)
