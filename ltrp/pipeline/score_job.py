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
import os
import posixpath
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from typing import Literal

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import torch
from fsspec.implementations.local import LocalFileSystem

from ltrp.core.leave_one_out import Metric, Mode, loo_scores
from ltrp.core.mae import MAE
from ltrp.core.masking import visible_sets
from ltrp.data.checkpoints import load_mae
from ltrp.data.images import (
    Crop,
    ImageDecodeError,
    ImageLimits,
    displayed_size,
    render_view,
    to_model_input,
    view_geometry,
)
from ltrp.data.sources import Shard, SourceImage, plan_digest, plan_shards, read_shard
from ltrp.data.tables import ERRORS_SCHEMA, SCORES_SCHEMA

Precision = Literal["fp32", "bf16", "fp16"]
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
# Settings that change how fast, not what: left out of the metadata.
_EXECUTION_ONLY = ("mae", "output", "batch_size", "scorers", "scorer_cpus", "scorer_threads")
# Settings that change the scores: a resumed job must agree with the first run on all of them.
_FINGERPRINT = (
    "source",
    "plan_digest",
    "shard_size",
    "mae_sha256",
    "mae_config",
    "views",
    "crop",
    "flip",
    "mask_ratio",
    "seed",
    "mode",
    "metric",
    "precision",
    "min_side",
    "max_pixels",
)


@dataclass
class ScoreJobConfig:
    source: str  # folder, s3:// prefix, .tar shard or manifest: see `ltrp.data.sources.plan_shards`
    mae: str  # MAE checkpoint with a decoder: see `ltrp.load_mae`
    output: str  # local folder or s3:// prefix
    views: int = 1  # views per image, each its own crop, flip and visible set
    crop: Crop = "center"  # "random": RandomResizedCrop geometry, scale 0.2-1
    flip: bool = False  # mirror half of the views
    mask_ratio: float = 0.9
    seed: int = 0
    mode: Mode = "decoder"
    metric: Metric = "l1"
    precision: Precision = "fp32"  # fp16 keeps the ranking better than bf16 at the same speed
    batch_size: int = 32  # views per scoring call
    shard_size: int = 256  # images per shard: the unit of commit and of resume
    scorers: int | None = None  # scoring actors; None: one per GPU in the cluster, else 1
    scorer_cpus: float = 1.0  # CPUs reserved by each scoring actor
    scorer_threads: int | None = None  # torch threads of a CPU scorer; None: this machine's cores
    min_side: int = 16
    max_pixels: int = 89_478_485


@dataclass(frozen=True)
class ScoreJobSummary:
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


def run_score_job(cfg: ScoreJobConfig) -> ScoreJobSummary:
    """Scores every image of `cfg.source` not already in `cfg.output`, on the current Ray cluster
    (a local one is started if none is connected). Fails before any work on a bad checkpoint."""
    start = time.perf_counter()
    mae = load_mae(cfg.mae)  # refuses a missing, encoder-only or mis-shaped checkpoint up front
    shards = plan_shards(cfg.source, cfg.shard_size)
    metadata = job_metadata(cfg, mae, shards)
    out = ScoreOutput(cfg.output)
    out.claim(metadata)
    done = out.committed_shards()
    pending = [s for s in shards if s.index not in done]
    images, rows, errors = 0, 0, 0
    if pending:
        for index, table in _assemble_shards(
            _pipeline(cfg, pending, mae.cfg.img_size, mae.cfg.grid, metadata)
        ):
            scored, failed = out.commit(index, table, metadata)
            rows += scored.num_rows
            errors += failed.num_rows
            images += len(set(scored.column("image_id").to_pylist()))
    out.finish(len(shards))
    return ScoreJobSummary(
        cfg.output, len(shards), len(shards) - len(pending), images, rows, errors, time.perf_counter() - start
    )


def job_metadata(cfg: ScoreJobConfig, mae: MAE, shards: list[Shard]) -> dict:
    """What a score table was computed with."""
    return {
        **{k: v for k, v in asdict(cfg).items() if k not in _EXECUTION_ONLY},
        "mae_uri": mae.checkpoint.uri,
        "mae_sha256": mae.checkpoint.sha256,
        "mae_format": mae.checkpoint.format,
        "mae_config": asdict(mae.cfg),
        "norm_pix": mae.cfg.norm_pix,
        "plan_digest": plan_digest(shards),
        "ltrp_version": importlib.metadata.version("ltrp"),
        "torch_version": torch.__version__,
    }


def _pipeline(
    cfg: ScoreJobConfig, pending: list[Shard], size: int, grid: int, metadata: dict
) -> ray.data.Dataset:
    gpus = int(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0
    scorers = cfg.scorers or max(1, gpus)
    ds = ray.data.from_items([{"shard": s.to_json()} for s in pending], override_num_blocks=len(pending))
    # A decode worker holds the libraries (~0.6 GB measured, torch included) and one shard's pixels
    # (twice, while it builds the table): telling Ray keeps it from running more decodes than memory
    # allows and, as the options then differ from the scorers', from fusing decoding into the scoring
    # actors (decoding must scale on its own CPUs).
    shard_bytes = 3 * 2**28 + 2 * cfg.shard_size * cfg.views * size * size * 3
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
    env = {} if gpus else {"runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(threads)}}}
    return ds.map_batches(
        ShardScorer,
        fn_constructor_kwargs={"cfg": cfg, "sha256": metadata["mae_sha256"]},
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=scorers),
        num_gpus=1 if gpus else 0,
        num_cpus=cfg.scorer_cpus,
        **env,
    )


def decode_shards(batch: dict[str, np.ndarray], cfg: ScoreJobConfig, size: int, grid: int) -> pa.Table:
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


def _image_rows(image: SourceImage, cfg: ScoreJobConfig, size: int, grid: int) -> list[dict]:
    limits = ImageLimits(cfg.min_side, cfg.max_pixels)
    try:
        if image.error is not None:
            raise ImageDecodeError(image.error)
        width, height = displayed_size(image.data, limits)
        rows = []
        for view in range(cfg.views):
            geometry = view_geometry(
                image.image_id, view, width, height, seed=cfg.seed, crop=cfg.crop, flip=cfg.flip
            )
            visible = visible_sets(
                [image.image_id], grid=grid, mask_ratio=cfg.mask_ratio, seed=cfg.seed, view=view
            )
            rows.append(
                {
                    "image_id": image.image_id,
                    "uri": image.uri,
                    "label": image.label,
                    "view": view,
                    "crop_box": list(geometry.box),
                    "flip": geometry.flip,
                    "visible": visible[0].tolist(),
                    "pixels": render_view(image.data, geometry, size, limits).tobytes(),
                    "error": None,
                }
            )
        return rows
    except ImageDecodeError as err:
        return [_error_row(image, str(err))]


def _error_row(image: SourceImage, reason: str) -> dict:
    return {"image_id": image.image_id, "uri": image.uri, "label": image.label, "error": reason}


class ShardScorer:
    """Scoring stage: a Ray actor holding the MAE on its device; rows with pixels -> rows with scores."""

    def __init__(self, cfg: ScoreJobConfig, sha256: str) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
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


def _assemble_shards(ds: ray.data.Dataset):
    """Streams the pipeline's rows and yields (shard index, all its rows) as each shard completes."""
    parts: dict[int, list[pa.Table]] = defaultdict(list)
    counts: Counter[int] = Counter()
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        shard_col = batch.column("shard").to_numpy()
        for index in np.unique(shard_col):
            part = batch.filter(pa.array(shard_col == index))
            parts[index].append(part)
            counts[index] += part.num_rows
            if counts[index] == part.column("shard_rows")[0].as_py():
                yield int(index), pa.concat_tables(parts.pop(index))
    if parts:
        raise RuntimeError(f"the pipeline ended with shards {sorted(parts)} incomplete")


class ScoreOutput:
    """The output folder: claims it for one job, commits shards atomically, lists what is done."""

    def __init__(self, uri: str) -> None:
        self.uri = uri.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.uri)

    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def claim(self, metadata: dict) -> None:
        """Records the job's metadata, or checks that an earlier run's agrees (resume needs that)."""
        path = self._path("_ltrp_job.json")
        if self.fs.exists(path):
            earlier = json.loads(self.fs.cat_file(path))
            differs = [k for k in _FINGERPRINT if earlier.get(k) != metadata.get(k)]
            if differs:
                raise ValueError(
                    f"{self.uri} already holds scores of a different job (differs in: {', '.join(differs)}); "
                    "resuming needs the same corpus, checkpoint and settings: use another output"
                )
            return
        self.fs.makedirs(self.root, exist_ok=True)
        self.fs.pipe_file(path, json.dumps(metadata, indent=2).encode())

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
