"""The scoring job: an image corpus -> leave-one-out pseudo-scores as Parquet, fanned out with Ray Data.

Stages: the corpus's shards -> CPU decode tasks (bytes -> views as uint8 pixels) -> a pool of scoring
actors (one per GPU, or CPU actors; an autoscaling cluster may grow it) -> commit tasks, which commit
each shard as soon as all of its rows are in, combine each group of `--file-shards` committed shards
into one Parquet file, and send the driver one manifest row per shard (`ltrp.pipeline.shards`,
shared with the ranking job: exactly-once commits, resume, the errors table).

Output under OUTPUT (local path or s3://...):
    scores/part-00000.parquet ...  one row per (image, view): see `ltrp.data.tables.SCORES_SCHEMA`;
                                   a file per --file-shards shards (`_shards/`: those waiting for theirs)
    errors/part-00000.parquet ...  images that could not be used: image_id, uri, reason
    _ltrp_job.json                 run metadata, also in every file's Parquet key-value metadata ("ltrp")
    _SUCCESS                       written once every shard is committed
"""

from __future__ import annotations

import importlib.metadata
import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import mlflow
import pyarrow as pa
import ray
import torch

from ltrp.core.leave_one_out import AUTOCAST_DTYPES, loo_scores
from ltrp.core.mae import MAE
from ltrp.core.masking import cover_sets, visible_count, visible_sets
from ltrp.data.checkpoints import load_mae
from ltrp.data.sources import Corpus, Shard, SourceImage, plan_corpus, plan_digest
from ltrp.data.tables import SCORES_SCHEMA
from ltrp.pipeline import runtime
from ltrp.pipeline.configs import ScoreConfig, checking_inputs, result_fields
from ltrp.pipeline.shards import (
    FileGroups,
    ShardedOutput,
    commit_all,
    commit_stage,
    decode_shards,
    stage_schema,
    usable_images,
    view_rows,
)

# Rows between the stages: the view, the visible set to score, the pixels.
STAGE_SCHEMA = stage_schema(SCORES_SCHEMA.field("visible"))


def score_output(uri: str, groups: FileGroups) -> ShardedOutput:
    """A scoring job's output folder."""
    return ShardedOutput(uri, "scores", SCORES_SCHEMA, groups)


@dataclass(frozen=True)
class ScoreSummary:
    output: str
    shards: int
    shards_skipped: int  # finished by an earlier run
    images_scored: int
    rows_written: int
    errors: int
    seconds: float
    passed_over: dict[str, int]  # files of the source that are neither images nor tar shards, by suffix

    @property
    def images_per_second(self) -> float:
        return self.images_scored / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class ScorePlan:
    """What a scoring job will do, known before Ray starts: the MAE, the planned corpus, the metadata."""

    cfg: ScoreConfig
    mae: MAE
    corpus: Corpus
    metadata: dict
    out: ShardedOutput


def plan(cfg: ScoreConfig) -> ScorePlan:
    """Loads the MAE (refusing a missing, encoder-only or mis-shaped checkpoint) and plans the shards
    (refusing a source without images) and checks that the output holds nothing of another job,
    before any worker starts or anything is written."""
    with checking_inputs():
        mae = load_mae(cfg.mae)
        corpus = plan_corpus(cfg.source, cfg.shard_size)
        metadata = job_metadata(cfg, mae, corpus.shards)
        out = score_output(cfg.output, FileGroups(cfg.file_shards, len(corpus.shards)))
        out.check(metadata)
    return ScorePlan(cfg, mae, corpus, metadata, out)


def run(cfg: ScoreConfig) -> ScoreSummary:
    """The scoring job: plans, joins (or starts) Ray, scores into `cfg.output` inside an MLflow run
    (experiment ltrp-score) with the settings as params and the summary as metrics."""
    job = plan(cfg)
    runtime.start("ltrp-score")
    with mlflow.start_run(run_name=f"score {Path(cfg.source.rstrip('/')).name}"):
        mlflow.log_params(asdict(cfg))
        summary = execute(job)
        mlflow.log_metrics(
            {
                "images_scored": summary.images_scored,
                "rows_written": summary.rows_written,
                "shards_skipped": summary.shards_skipped,
                "errors": summary.errors,
                "files_passed_over": sum(summary.passed_over.values()),
                "wall_seconds": summary.seconds,
                "images_per_second": summary.images_per_second,
            }
        )
        mlflow.set_tag("output_uri", summary.output)
    return summary


def score_corpus(cfg: ScoreConfig) -> ScoreSummary:
    """`run` without MLflow: scores every image of `cfg.source` not already in `cfg.output`, on the
    Ray cluster this process is connected to (a local one is started if none is)."""
    return execute(plan(cfg))


def execute(job: ScorePlan, progress=print) -> ScoreSummary:
    """Claims the output and has the workers score and commit the shards it does not hold yet."""
    start = time.perf_counter()
    cfg = job.cfg
    out = job.out

    def manifests(pending: list[Shard], lease_token: str) -> Iterable[dict]:
        geometry = job.mae.cfg.img_size, job.mae.cfg.grid
        return _pipeline(cfg, pending, *geometry, job.metadata, out, lease_token).iter_rows()

    skipped, written = commit_all(out, "jobs.score", job.metadata, job.corpus.shards, manifests, progress)
    return ScoreSummary(
        cfg.output,
        len(job.corpus.shards),
        skipped,
        written.images,
        written.rows,
        written.errors,
        time.perf_counter() - start,
        job.corpus.passed_over,
    )


def job_metadata(cfg: ScoreConfig, mae: MAE, shards: list[Shard]) -> dict:
    """What a score table was computed with. Its "fingerprint" names the keys that decide the scores:
    every result-changing field of the config (all but the execution-only ones), what is derived from
    the inputs (the corpus plan, the MAE's bytes and geometry) and, in encoder mode, what v's decoder
    slot holds. A resume must agree on all."""
    fingerprint = {
        **result_fields(cfg),
        "plan_digest": plan_digest(shards),
        "mae_sha256": mae.checkpoint.sha256,
        "mae_config": asdict(mae.cfg),
    }
    if cfg.mode == "encoder":
        # Encoder mode once dropped v's decoder slot; now the slot holds the mask token. Tables of the
        # old kind lack this key, so they are neither resumed nor mixed (decoder mode is unchanged).
        fingerprint["encoder_slot"] = "mask_token"
    return {
        **fingerprint,
        "fingerprint": sorted(fingerprint),
        "mae_uri": mae.checkpoint.uri,
        "mae_format": mae.checkpoint.format,
        "norm_pix": mae.cfg.norm_pix,
        "ltrp_version": importlib.metadata.version("ltrp"),
        "torch_version": torch.__version__,
    }


def _pipeline(
    cfg: ScoreConfig,
    pending: list[Shard],
    size: int,
    grid: int,
    metadata: dict,
    out: ShardedOutput,
    lease_token: str,
) -> ray.data.Dataset:
    """Wires the stages into Ray Data: each stage's resources and batch size are declared here."""
    gpu = runtime.use_gpu(cfg.device)
    ds = ray.data.from_items([{"shard": s.to_json()} for s in pending], override_num_blocks=len(pending))
    # A decode worker holds the libraries (~0.6 GB measured, torch included) and one shard's pixels
    # (twice, while it builds the table): telling Ray keeps it from running more decodes than memory
    # allows and, as the options then differ from the scorers', from fusing decoding into the scoring
    # actors (decoding must scale on its own CPUs).
    shard_bytes = 3 * 2**28 + 2 * cfg.shard_size * rows_per_image(cfg, grid) * size * size * 3
    ds = ds.map_batches(
        decode_shards,
        fn_kwargs={
            "image_rows": partial(image_rows, cfg=cfg, size=size, grid=grid),
            "schema": STAGE_SCHEMA,
        },
        batch_size=1,
        batch_format="numpy",
        num_cpus=1,
        memory=shard_bytes,
    )
    ds = ds.map_batches(
        ShardScorer,
        fn_constructor_kwargs={"cfg": cfg, "sha256": metadata["mae_sha256"], "gpu": gpu},
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        compute=runtime.actor_pool(cfg.scorers, cfg.max_scorers, gpu),
        num_gpus=1 if gpu else 0,
        num_cpus=cfg.scorer_cpus,
        **runtime.actor_threads(gpu, cfg.scorer_cpus, cfg.scorer_threads),
    )
    return commit_stage(ds, out, metadata, lease_token, cfg.shard_size * rows_per_image(cfg, grid))


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
    """Scoring stage: a Ray actor holding the MAE on its device; rows with pixels -> rows with scores."""

    def __init__(self, cfg: ScoreConfig, sha256: str, gpu: bool) -> None:
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
            values = loo_scores(
                self.mae,
                images,
                visible,
                mode=self.cfg.mode,
                metric=self.cfg.metric,
                autocast_dtype=AUTOCAST_DTYPES[self.cfg.precision],
            )
            for i, row in zip(ok, values.cpu().tolist(), strict=True):
                scores[i] = row
        return batch.drop_columns(["pixels"]).append_column(
            "scores", pa.array(scores, pa.list_(pa.float32()))
        )
