"""The ranking job: a trained ranker over an image corpus -> its patch scores and order as Parquet.

Stages: the corpus's shards -> CPU decode tasks (bytes -> views as uint8 pixels) -> a pool of ranking
actors (one per GPU, or CPU actors; an autoscaling cluster may grow it) -> commit tasks, which commit
each shard as soon as all of its rows are in and combine each group of `--file-shards` shards into one
Parquet file. The decode stage, the shard commits, resume and the errors table are the scoring
job's own (`ltrp.pipeline.shards`).

The ranker travels to the actors as weights and geometry, not as the registry's artifact: the driver
loads it once, records its weights' sha256, and every actor checks that digest.

Output under OUTPUT (local path or s3://...):
    ranks/part-00000.parquet ...   one row per (image, view): see `ltrp.data.tables.RANKS_SCHEMA`;
                                   a file per --file-shards shards (`_shards/`: those waiting for theirs)
    errors/part-00000.parquet ...  images that could not be used: image_id, uri, reason
    _ltrp_job.json                 run metadata (the model's name, version and sha256 among it)
    _SUCCESS                       written once every shard is committed
"""

from __future__ import annotations

import importlib.metadata
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import mlflow
import pyarrow as pa
import ray
import torch
from mlflow.entities.model_registry import ModelVersion

from ltrp.core.ranker import Ranker, RankerConfig
from ltrp.data.checkpoints import weights_sha256
from ltrp.data.sources import Corpus, Shard, SourceImage, plan_corpus, plan_digest
from ltrp.data.tables import RANKS_SCHEMA
from ltrp.pipeline import runtime
from ltrp.pipeline.configs import RankConfig, checking_inputs, result_fields
from ltrp.pipeline.registry import load_ranker_ref
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

#: Rows between the stages: the view and its pixels.
STAGE_SCHEMA = stage_schema()


def rank_output(uri: str, groups: FileGroups) -> ShardedOutput:
    """A ranking job's output folder."""
    return ShardedOutput(uri, "ranks", RANKS_SCHEMA, groups)


@dataclass(frozen=True)
class RankSummary:
    output: str
    shards: int
    shards_skipped: int  # finished by an earlier run
    images_ranked: int
    rows_written: int
    errors: int
    seconds: float
    passed_over: dict[str, int]  # files of the source that are neither images nor tar shards, by suffix

    @property
    def images_per_second(self) -> float:
        return self.images_ranked / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class RankPlan:
    """What a ranking job will do, known before Ray starts: the ranker, the planned corpus, the metadata."""

    cfg: RankConfig
    ranker: Ranker
    corpus: Corpus
    metadata: dict
    out: ShardedOutput


def plan(cfg: RankConfig) -> RankPlan:
    """Loads the ranker (refusing a missing registry version or a file that is not a ranker), plans
    the shards (refusing a source without images) and checks that the output holds nothing of another
    job, before any worker starts or anything is written."""
    with checking_inputs():
        ranker, version = load_ranker_ref(cfg.model)
        corpus = plan_corpus(cfg.source, cfg.shard_size)
        metadata = job_metadata(cfg, ranker, version, corpus.shards)
        out = rank_output(cfg.output, FileGroups(cfg.file_shards, len(corpus.shards)))
        out.check(metadata)
    return RankPlan(cfg, ranker, corpus, metadata, out)


def run(cfg: RankConfig, progress=print) -> RankSummary:
    """The ranking job: plans, joins (or starts) Ray, ranks into `cfg.output` inside an MLflow run
    (experiment ltrp-rank) with the settings as params, the model as tags and the summary as metrics."""
    runtime.track()  # the registry to load the ranker from
    job = plan(cfg)
    runtime.start("ltrp-rank")
    with mlflow.start_run(run_name=f"rank {Path(cfg.source.rstrip('/')).name}"):
        mlflow.log_params(asdict(cfg))
        meta = job.metadata
        mlflow.set_tags({f"model_{k}": str(meta[f"model_{k}"]) for k in ("uri", "name", "version", "sha256")})
        summary = execute(job, progress)
        mlflow.log_metrics(
            {
                "images_ranked": summary.images_ranked,
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


def execute(job: RankPlan, progress=print) -> RankSummary:
    """Claims the output and has the workers rank and commit the shards it does not hold yet."""
    start = time.perf_counter()
    cfg = job.cfg
    out = job.out

    def manifests(pending: list[Shard], lease_token: str) -> Iterable[dict]:
        return _pipeline(cfg, pending, job.ranker, job.metadata, out, lease_token).iter_rows()

    skipped, written = commit_all(out, "jobs.rank", job.metadata, job.corpus.shards, manifests, progress)
    return RankSummary(
        cfg.output,
        len(job.corpus.shards),
        skipped,
        written.images,
        written.rows,
        written.errors,
        time.perf_counter() - start,
        job.corpus.passed_over,
    )


def job_metadata(cfg: RankConfig, ranker: Ranker, version: ModelVersion | None, shards: list[Shard]) -> dict:
    """What a rank table was computed with. Its "fingerprint": every result-changing field of the
    config, the corpus plan, and the ranker's weights and geometry (not where they were loaded from:
    the same version by alias or by number is the same job)."""
    fingerprint = {
        **result_fields(cfg),
        "plan_digest": plan_digest(shards),
        "model_sha256": weights_sha256(ranker),
        "ranker_config": asdict(ranker.cfg),
    }
    return {
        **fingerprint,
        "fingerprint": sorted(fingerprint),
        "model_uri": cfg.model,
        "model_name": version.name if version else None,
        "model_version": version.version if version else None,
        "ltrp_version": importlib.metadata.version("ltrp"),
        "torch_version": torch.__version__,
    }


def _pipeline(
    cfg: RankConfig,
    pending: list[Shard],
    ranker: Ranker,
    metadata: dict,
    out: ShardedOutput,
    lease_token: str,
) -> ray.data.Dataset:
    """Wires the stages into Ray Data: each stage's resources and batch size are declared here."""
    gpu = runtime.use_gpu(cfg.device)
    size = ranker.cfg.img_size
    ds = ray.data.from_items([{"shard": s.to_json()} for s in pending], override_num_blocks=len(pending))
    # As in the scoring job: the libraries (~0.6 GB) and a shard's pixels twice; declaring it keeps
    # decoding from being fused into the ranking actors, so that it scales on its own CPUs.
    shard_bytes = 3 * 2**28 + 2 * cfg.shard_size * cfg.views * size * size * 3
    ds = ds.map_batches(
        decode_shards,
        fn_kwargs={"image_rows": partial(image_rows, cfg=cfg, size=size), "schema": STAGE_SCHEMA},
        batch_size=1,
        batch_format="numpy",
        num_cpus=1,
        memory=shard_bytes,
    )
    ds = ds.map_batches(
        ShardRanker,
        fn_constructor_kwargs={
            "ranker_config": asdict(ranker.cfg),
            "weights": ranker.state_dict(),
            "sha256": metadata["model_sha256"],
            "gpu": gpu,
        },
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        compute=runtime.actor_pool(cfg.rankers, cfg.max_rankers, gpu),
        num_gpus=1 if gpu else 0,
        num_cpus=cfg.ranker_cpus,
        **runtime.actor_threads(gpu, cfg.ranker_cpus, cfg.ranker_threads),
    )
    return commit_stage(ds, out, metadata, lease_token, cfg.shard_size * cfg.views)


def image_rows(image: SourceImage, cfg: RankConfig, size: int) -> list[dict]:
    """The decode stage's rows of one image: its views."""
    return view_rows(image, range(cfg.views), cfg, size)


class ShardRanker:
    """Ranking stage: a Ray actor holding the ranker on its device; rows with pixels -> rows with the
    ranker's scores (fp16) and positions in ranked order (int16)."""

    def __init__(self, ranker_config: dict, weights: dict, sha256: str, gpu: bool) -> None:
        self.device = torch.device("cuda" if gpu else "cpu")
        ranker = Ranker(RankerConfig(**ranker_config))
        ranker.load_state_dict(weights)  # strict: the geometry and the weights must agree
        if weights_sha256(ranker) != sha256:
            raise RuntimeError(f"the ranker's weights arrived changed (sha256 is not {sha256[:12]}...)")
        self.ranker = ranker.to(self.device).eval()

    @torch.inference_mode()
    def __call__(self, batch: pa.Table) -> pa.Table:
        ok, images = usable_images(batch, self.ranker.cfg.img_size, self.device)
        scores: list[list[float] | None] = [None] * batch.num_rows
        order: list[list[int] | None] = [None] * batch.num_rows
        if len(ok):
            values = self.ranker(images).float()  # (B, L)
            ranked = values.argsort(dim=1, descending=True, stable=True)
            for i, row, positions in zip(ok, values.cpu().tolist(), ranked.cpu().tolist(), strict=True):
                scores[i], order[i] = row, positions
        return (
            batch.drop_columns(["pixels"])
            .append_column("scores", pa.array(scores, pa.list_(pa.float16())))
            .append_column("order", pa.array(order, pa.list_(pa.int16())))
        )
