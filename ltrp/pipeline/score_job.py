"""The scoring job: an image corpus -> leave-one-out pseudo-scores as Parquet, fanned out with Ray Data.

Stages: the corpus's shards -> CPU decode tasks (bytes -> views as uint8 pixels) -> a pool of scoring
actors (one per GPU, or CPU actors) -> the driver, which commits each shard as one Parquet file as soon
as all of its rows are in. A shard's file appears whole or not at all, so a re-run skips finished shards,
redoes unfinished ones, and the table never holds a duplicate or a gap. (Ray's own `write_parquet`
names files by task and cannot resume like this; its checkpointing filters rows at read time and may
write a block twice.)

Output under OUTPUT (local path or s3://...):
    scores/part-00000.parquet ...  one row per (image, view): see `ltrp.data.tables.SCORES_SCHEMA`
    errors/part-00000.parquet ...  images that could not be used: image_id, uri, reason
    _ltrp_job.json                 run metadata, also in every file's Parquet key-value metadata ("ltrp")
    _SUCCESS                       written once every shard is committed
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import posixpath
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import fsspec
import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import torch
from fsspec.implementations.local import LocalFileSystem

from ltrp.core.leave_one_out import loo_scores
from ltrp.core.mae import MAE
from ltrp.core.masking import cover_sets, visible_count, visible_sets
from ltrp.data.checkpoints import load_mae
from ltrp.data.images import (
    ImageDecodeError,
    ImageLimits,
    displayed_size,
    render_view,
    to_model_input,
    view_geometry,
)
from ltrp.data.sources import Shard, SourceImage, plan_digest, plan_shards, read_shard
from ltrp.data.tables import ERRORS_SCHEMA, JOB_FILE, SCORES_SCHEMA
from ltrp.pipeline import runtime
from ltrp.pipeline.configs import ScoreConfig, checking_inputs, result_fields

#: --precision -> the autocast dtype of the scorers
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# Rows between the stages: the output columns but scores, plus where they belong and the pixels.
_STAGE_SCHEMA = pa.schema(
    [
        ("shard", pa.int32()),
        ("shard_rows", pa.int32()),
        *list(SCORES_SCHEMA)[:-1],
        ("pixels", pa.binary()),
        ("error", pa.string()),
    ]
)


@dataclass(frozen=True)
class ScoreSummary:
    output: str
    shards: int
    shards_skipped: int  # finished by an earlier run
    images_scored: int
    rows_written: int
    errors: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images_scored / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class ScorePlan:
    """What a scoring job will do, known before Ray starts: the loaded MAE, the shards, the metadata."""

    cfg: ScoreConfig
    mae: MAE
    shards: list[Shard]
    metadata: dict


def plan(cfg: ScoreConfig) -> ScorePlan:
    """Loads the MAE (refusing a missing, encoder-only or mis-shaped checkpoint) and plans the shards
    (refusing a source without images) and checks that the output holds nothing of another job,
    before any worker starts or anything is written."""
    with checking_inputs():
        mae = load_mae(cfg.mae)
        shards = plan_shards(cfg.source, cfg.shard_size)
        metadata = job_metadata(cfg, mae, shards)
        ScoreOutput(cfg.output).check(metadata)
    return ScorePlan(cfg, mae, shards, metadata)


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


def execute(job: ScorePlan) -> ScoreSummary:
    """Claims the output, scores the shards it does not hold yet, commits each as it completes."""
    start = time.perf_counter()
    cfg = job.cfg
    out = ScoreOutput(cfg.output)
    out.claim(job.metadata)
    done = out.committed_shards()
    pending = [s for s in job.shards if s.index not in done]
    images, rows, errors = 0, 0, 0
    if pending:
        batches = _pipeline(cfg, pending, job.mae.cfg.img_size, job.mae.cfg.grid, job.metadata)
        for index, table in assemble_shards(batches.iter_batches(batch_format="pyarrow", batch_size=None)):
            scored, failed = out.commit(index, table, job.metadata)
            rows += scored.num_rows
            errors += failed.num_rows
            images += len(set(scored.column("image_id").to_pylist()))
    out.finish(len(job.shards))
    return ScoreSummary(
        cfg.output,
        len(job.shards),
        len(job.shards) - len(pending),
        images,
        rows,
        errors,
        time.perf_counter() - start,
    )


def job_metadata(cfg: ScoreConfig, mae: MAE, shards: list[Shard]) -> dict:
    """What a score table was computed with. Its "fingerprint" names the keys that decide the scores:
    every result-changing field of the config (all but the execution-only ones) and what is derived
    from the inputs (the corpus plan, the MAE's bytes and geometry). A resume must agree on all."""
    fingerprint = {
        **result_fields(cfg),
        "plan_digest": plan_digest(shards),
        "mae_sha256": mae.checkpoint.sha256,
        "mae_config": asdict(mae.cfg),
    }
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
    cfg: ScoreConfig, pending: list[Shard], size: int, grid: int, metadata: dict
) -> ray.data.Dataset:
    """Wires the stages into Ray Data: each stage's resources and batch size are declared here."""
    gpu = runtime.use_gpu(cfg.device)
    scorers = cfg.scorers or max(1, runtime.cluster_gpus() if gpu else 1)
    ds = ray.data.from_items([{"shard": s.to_json()} for s in pending], override_num_blocks=len(pending))
    # A decode worker holds the libraries (~0.6 GB measured, torch included) and one shard's pixels
    # (twice, while it builds the table): telling Ray keeps it from running more decodes than memory
    # allows and, as the options then differ from the scorers', from fusing decoding into the scoring
    # actors (decoding must scale on its own CPUs).
    shard_bytes = 3 * 2**28 + 2 * cfg.shard_size * rows_per_image(cfg, grid) * size * size * 3
    ds = ds.map_batches(
        decode_shards,
        fn_kwargs={"cfg": cfg, "size": size, "grid": grid},
        batch_size=1,
        batch_format="numpy",
        num_cpus=1,
        memory=shard_bytes,
    )
    # Ray starts a worker with as many OpenMP threads as CPUs it reserved (one), which halved CPU
    # scoring on a 2-core node; raising it later with torch.set_num_threads made it slower still
    # (measured: 0.33 and 0.27 img/s against 0.61 with the variable set at start). Scoring dominates
    # and decoding is light, so CPU scorers get every core.
    threads = cfg.scorer_threads or os.cpu_count() or 1
    env = {} if gpu else {"runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(threads)}}}
    return ds.map_batches(
        ShardScorer,
        fn_constructor_kwargs={"cfg": cfg, "sha256": metadata["mae_sha256"], "gpu": gpu},
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=scorers),
        num_gpus=1 if gpu else 0,
        num_cpus=cfg.scorer_cpus,
        **env,
    )


def rows_per_image(cfg: ScoreConfig, grid: int) -> int:
    """Rows the table holds per image: its views, or the cover sets of its one view."""
    if cfg.cover:
        return cfg.cover * math.ceil(grid * grid / visible_count(grid * grid, cfg.mask_ratio))
    return cfg.views


def decode_shards(batch: dict[str, np.ndarray], cfg: ScoreConfig, size: int, grid: int) -> pa.Table:
    """Decode stage: shard descriptors -> one row per (image, view) with uint8 pixels, and one row per
    unusable image with the reason. Every row carries its shard's row count, so the driver knows
    when a shard is complete."""
    rows = []
    for text in batch["shard"]:
        shard = Shard.from_json(str(text))
        shard_rows = [row for image in read_shard(shard) for row in _image_rows(image, cfg, size, grid)]
        if not shard_rows:  # still commit the shard, so that it counts as done
            shard_rows = [
                _error_row(
                    SourceImage(shard.tar or str(shard.index), shard.tar or "", None), "shard holds no images"
                )
            ]
        rows += [{**row, "shard": shard.index, "shard_rows": len(shard_rows)} for row in shard_rows]
    return pa.Table.from_pylist(rows, schema=_STAGE_SCHEMA)


def _image_rows(image: SourceImage, cfg: ScoreConfig, size: int, grid: int) -> list[dict]:
    limits = ImageLimits(cfg.min_side, cfg.max_pixels)
    try:
        if image.error is not None:
            raise ImageDecodeError(image.error)
        width, height = displayed_size(image.data, limits)
        rows = []
        for view, visible in enumerate(_visible_sets(image.image_id, cfg, grid)):
            # Cover mode scores many visible sets of one view: the row's "view" numbers its set.
            geometry = view_geometry(
                image.image_id,
                0 if cfg.cover else view,
                width,
                height,
                seed=cfg.seed,
                crop=cfg.crop,
                flip=cfg.flip,
            )
            rows.append(
                {
                    "image_id": image.image_id,
                    "uri": image.uri,
                    "label": image.label,
                    "view": view,
                    "crop_box": list(geometry.box),
                    "flip": geometry.flip,
                    "visible": visible.tolist(),
                    "pixels": render_view(image.data, geometry, size, limits).tobytes(),
                    "error": None,
                }
            )
        return rows
    except ImageDecodeError as err:
        return [_error_row(image, str(err))]


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


def _error_row(image: SourceImage, reason: str) -> dict:
    return {"image_id": image.image_id, "uri": image.uri, "label": image.label, "error": reason}


class ShardScorer:
    """Scoring stage: a Ray actor holding the MAE on its device; rows with pixels -> rows with scores."""

    def __init__(self, cfg: ScoreConfig, sha256: str, gpu: bool) -> None:
        self.device = torch.device("cuda" if gpu else "cpu")
        self.mae = load_mae(cfg.mae).to(self.device)
        if self.mae.checkpoint.sha256 != sha256:
            raise RuntimeError(f"{cfg.mae} changed since the job started (sha256 {sha256[:12]}...)")
        self.cfg = cfg

    def __call__(self, batch: pa.Table) -> pa.Table:
        ok = np.flatnonzero(pc.is_null(batch.column("error")).to_numpy(zero_copy_only=False))
        scores: list[list[float] | None] = [None] * batch.num_rows
        if len(ok):
            size = self.mae.cfg.img_size
            pixels = np.frombuffer(bytearray(b"".join(batch.column("pixels").take(ok).to_pylist())), np.uint8)
            images = to_model_input(torch.from_numpy(pixels.reshape(len(ok), size, size, 3)).to(self.device))
            visible = torch.tensor(batch.column("visible").take(ok).to_pylist(), device=self.device)
            values = (
                loo_scores(
                    self.mae,
                    images,
                    visible,
                    mode=self.cfg.mode,
                    metric=self.cfg.metric,
                    autocast_dtype=PRECISIONS[self.cfg.precision],
                )
                .cpu()
                .tolist()
            )
            for i, row in zip(ok, values, strict=True):
                scores[i] = row
        return batch.drop_columns(["pixels"]).append_column(
            "scores", pa.array(scores, pa.list_(pa.float32()))
        )


def assemble_shards(batches: Iterable[pa.Table]) -> Iterator[tuple[int, pa.Table]]:
    """Regroups the scored rows, which arrive in batches of any shards in any order, and yields
    (shard index, all its rows) as each shard completes (its rows carry the shard's row count)."""
    parts: dict[int, list[pa.Table]] = defaultdict(list)
    counts: Counter[int] = Counter()
    for batch in batches:
        shard_col = batch.column("shard").to_numpy()
        for index in map(int, np.unique(shard_col)):
            part = batch.filter(pa.array(shard_col == index))
            parts[index].append(part)
            counts[index] += part.num_rows
            if counts[index] == part.column("shard_rows")[0].as_py():
                yield index, pa.concat_tables(parts.pop(index))
    if parts:
        raise RuntimeError(f"the pipeline ended with shards {sorted(parts)} incomplete")


class ScoreOutput:
    """The output folder: claims it for one job, commits shards atomically, lists what is done."""

    def __init__(self, uri: str) -> None:
        self.uri = uri.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.uri)

    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def check(self, metadata: dict) -> bool:
        """Whether an earlier run of this job holds the output; refuses one of a different job (a resume
        needs the same corpus, checkpoint and result-changing settings)."""
        path = self._path(JOB_FILE)
        if not self.fs.exists(path):
            return False
        earlier = json.loads(self.fs.cat_file(path))
        keys = set(earlier.get("fingerprint", [])) | set(metadata["fingerprint"])
        differs = sorted(k for k in keys if earlier.get(k) != metadata.get(k))
        if differs:
            raise ValueError(
                f"{self.uri} already holds scores of a different job (differs in: {', '.join(differs)}); "
                "resuming needs the same corpus, checkpoint and settings: use another output"
            )
        return True

    def claim(self, metadata: dict) -> None:
        """Records the job's metadata, unless an earlier run of the same job already did."""
        if not self.check(metadata):
            self.fs.makedirs(self.root, exist_ok=True)
            self.fs.pipe_file(self._path(JOB_FILE), json.dumps(metadata, indent=2).encode())

    def committed_shards(self) -> set[int]:
        names = self.fs.glob(self._path("scores", "part-*.parquet"))
        return {int(posixpath.basename(n)[len("part-") : -len(".parquet")]) for n in names}

    def commit(self, index: int, table: pa.Table, metadata: dict) -> tuple[pa.Table, pa.Table]:
        """Writes a complete shard: its errors first, then its scores, whose file marks it done."""
        table = table.sort_by([("image_id", "ascending"), ("view", "ascending")])
        failed = pc.is_valid(table.column("error"))
        errors = table.filter(failed).select(["image_id", "uri", "error"]).rename_columns(ERRORS_SCHEMA.names)
        scored = table.filter(pc.invert(failed)).select(SCORES_SCHEMA.names)
        kv = {"ltrp": json.dumps(metadata)}
        self._write(
            self._path("errors", f"part-{index:05d}.parquet"), errors.cast(ERRORS_SCHEMA.with_metadata(kv))
        )
        self._write(
            self._path("scores", f"part-{index:05d}.parquet"), scored.cast(SCORES_SCHEMA.with_metadata(kv))
        )
        return scored, errors

    def finish(self, shards: int) -> None:
        done = self.committed_shards()
        if len(done) != shards:
            raise RuntimeError(f"{self.uri}: {shards - len(done)} of {shards} shards are not committed")
        self.fs.pipe_file(self._path("_SUCCESS"), b"")

    def _write(self, path: str, table: pa.Table) -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        data = sink.getvalue().to_pybytes()
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        if isinstance(self.fs, LocalFileSystem):  # a rename is atomic; readers skip dot-files
            tmp = posixpath.join(posixpath.dirname(path), f".{uuid.uuid4().hex}.tmp")
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, path)
        else:  # an object store shows a PUT whole or not at all
            self.fs.pipe_file(path, data)
