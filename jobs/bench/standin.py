"""A stand-in for the scoring model at GPU speed: the scoring job with its CPU side only (issue 32).

`StandInScorer` is a scoring stage that computes nothing. It holds each batch as long as a device scoring
`views_per_second` would, sleeping (no CPU, as a process waiting on its GPU), and returns the rows
`ShardScorer` returns: the decode stage's columns without the pixels, plus `scores`, one float32 per
visible patch (null for a row whose image failed to decode). `StandInScoreJob` is the library's scoring
job with that stage in place of the MAE's, and a fingerprint key of its own, so that its tables are
never resumed as, or mixed with, real ones. Both live under jobs/bench/, which no job imports and the
wheel does not ship: only a benchmark can select them.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ltrp.data.tables import SCORES_SCHEMA
from ltrp.pipeline.configs import ScoreConfig
from ltrp.pipeline.score_job import ScoreJob
from ltrp.pipeline.stages import Stage

SCORES_TYPE = SCORES_SCHEMA.field("scores").type


class StandInScorer:
    """Scoring stage at a fixed rate per actor, without arithmetic: rows with pixels -> rows with scores."""

    def __init__(self, views_per_second: float) -> None:
        if views_per_second <= 0:
            raise ValueError(f"views_per_second must be > 0, got {views_per_second}")
        self.seconds_per_view = 1 / views_per_second

    def __call__(self, batch: pa.Table) -> pa.Table:
        done = time.perf_counter() + batch.num_rows * self.seconds_per_view  # when a device would be
        visible = batch.column("visible").combine_chunks()
        failed = pc.is_valid(batch.column("error")).combine_chunks()
        zeros = pa.array(np.zeros(len(visible.values), np.float32))
        scores = pa.ListArray.from_arrays(visible.offsets, zeros, type=SCORES_TYPE, mask=failed)
        rows = batch.drop_columns(["pixels"]).append_column("scores", scores)
        time.sleep(max(0.0, done - time.perf_counter()))
        return rows


class StandInScoreJob(ScoreJob):
    """The scoring job, its MAE stage replaced by `StandInScorer` at `views_per_second` per actor."""

    def __init__(self, cfg: ScoreConfig, views_per_second: float) -> None:
        self.views_per_second = views_per_second  # before planning: the fingerprint names it
        super().__init__(cfg)

    def model_keys(self) -> dict:
        return {**super().model_keys(), "scorer": f"stand-in at {self.views_per_second:g} views/s"}

    def model_stage(self, gpu: bool) -> Stage:
        return Stage(
            StandInScorer,
            batch_size=self.cfg.batch_size,
            kwargs={"views_per_second": self.views_per_second},
            **self.actor_resources(gpu),
        )
