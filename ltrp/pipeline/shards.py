"""What every job that maps an image corpus to a table shares (the scoring and the ranking job): the
decode stage (shards -> one row per view with its pixels, or the reason an image cannot be used), the
regrouping of a model stage's rows by shard, and the output folder that commits each shard exactly once.

A shard's file appears whole or not at all, so a re-run skips finished shards, redoes unfinished ones,
and the table never holds a duplicate or a gap. (Ray's own `write_parquet` names files by task and
cannot resume like this; its checkpointing filters rows at read time and may write a block twice.)

Output under OUTPUT (local path or s3://...):
    TABLE/part-00000.parquet ...   the job's rows (TABLE: "scores", "ranks")
    errors/part-00000.parquet ...  images that could not be used: image_id, uri, reason
    _ltrp_job.json                 the job's metadata, also in every file's Parquet key-value metadata
    _SUCCESS                       written once every shard is committed
"""

from __future__ import annotations

import json
import posixpath
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from fsspec.implementations.local import LocalFileSystem

from ltrp.core.options import Crop
from ltrp.data.images import (
    ImageDecodeError,
    ImageLimits,
    displayed_size,
    render_view,
    to_model_input,
    view_geometry,
)
from ltrp.data.sources import Shard, SourceImage, read_shard
from ltrp.data.tables import ERRORS_SCHEMA, JOB_FILE, SCORES_SCHEMA
from ltrp.pipeline.lease import Lease

#: The view columns every job's table starts with (the score table's first six).
VIEW_COLUMNS = list(SCORES_SCHEMA)[:6]


def stage_schema(*columns: pa.Field) -> pa.Schema:
    """The rows between the decode and the model stage: where each belongs (shard, and how many rows
    the shard has, so the driver knows when it is complete), the view, the job's own input columns,
    the pixels, and the error of an image that cannot be used."""
    return pa.schema(
        [
            ("shard", pa.int32()),
            ("shard_rows", pa.int32()),
            *VIEW_COLUMNS,
            *columns,
            ("pixels", pa.binary()),
            ("error", pa.string()),
        ]
    )


class ViewOptions(Protocol):
    """The config fields that decide an image's views (ScoreConfig and RankConfig have them)."""

    crop: Crop
    flip: bool
    seed: int
    min_side: int
    max_pixels: int


def view_rows(image: SourceImage, geometry_views: Sequence[int], cfg: ViewOptions, size: int) -> list[dict]:
    """Row i renders view `geometry_views[i]` of `image` (its crop and flip, from the image id and the
    seed) at size x size pixels, numbered view i.

    Raises:
        ImageDecodeError: the image cannot be read, decoded, or is too small or too large.
    """
    if image.error is not None:
        raise ImageDecodeError(image.error)
    limits = ImageLimits(cfg.min_side, cfg.max_pixels)
    width, height = displayed_size(image.data, limits)
    rows = []
    for view, geometry_view in enumerate(geometry_views):
        geometry = view_geometry(
            image.image_id, geometry_view, width, height, seed=cfg.seed, crop=cfg.crop, flip=cfg.flip
        )
        rows.append(
            {
                "image_id": image.image_id,
                "uri": image.uri,
                "label": image.label,
                "view": view,
                "crop_box": list(geometry.box),
                "flip": geometry.flip,
                "pixels": render_view(image.data, geometry, size, limits).tobytes(),
                "error": None,
            }
        )
    return rows


def decode_shards(
    batch: dict[str, np.ndarray], image_rows: Callable[[SourceImage], list[dict]], schema: pa.Schema
) -> pa.Table:
    """Decode stage: shard descriptors -> `image_rows(image)` for each image of each shard, or one
    error row for an image it refuses (ImageDecodeError). Every row carries its shard's row count."""
    rows = []
    for text in batch["shard"]:
        shard = Shard.from_json(str(text))
        shard_rows = [row for image in read_shard(shard) for row in _rows_or_error(image, image_rows)]
        if not shard_rows:  # still commit the shard, so that it counts as done
            empty = SourceImage(shard.tar or str(shard.index), shard.tar or "", None)
            shard_rows = [_error_row(empty, "shard holds no images")]
        rows += [{**row, "shard": shard.index, "shard_rows": len(shard_rows)} for row in shard_rows]
    return pa.Table.from_pylist(rows, schema=schema)


def _rows_or_error(image: SourceImage, image_rows: Callable[[SourceImage], list[dict]]) -> list[dict]:
    try:
        return image_rows(image)
    except ImageDecodeError as err:
        return [_error_row(image, str(err))]


def _error_row(image: SourceImage, reason: str) -> dict:
    return {"image_id": image.image_id, "uri": image.uri, "label": image.label, "error": reason}


def usable_images(batch: pa.Table, size: int, device: torch.device) -> tuple[np.ndarray, torch.Tensor]:
    """A model stage's input: the rows of `batch` without an error, and their pixels as model inputs
    (B, 3, size, size) on `device`, ImageNet mean/std normalised."""
    ok = np.flatnonzero(pc.is_null(batch.column("error")).to_numpy(zero_copy_only=False))
    pixels = np.frombuffer(bytearray(b"".join(batch.column("pixels").take(ok).to_pylist())), np.uint8)
    return ok, to_model_input(torch.from_numpy(pixels.reshape(len(ok), size, size, 3)).to(device))


def assemble_shards(batches: Iterable[pa.Table]) -> Iterator[tuple[int, pa.Table]]:
    """Regroups a model stage's rows, which arrive in batches of any shards in any order, and yields
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


class ShardedOutput:
    """A job's output folder: claims it for one job, commits shards atomically, lists what is done.

    Args:
        uri: the folder, local or s3://.
        table: the folder of the job's rows ("scores", "ranks").
        schema: the rows' schema; a commit selects and casts to it.
    """

    def __init__(self, uri: str, table: str, schema: pa.Schema) -> None:
        self.uri = uri.rstrip("/")
        self.table = table
        self.schema = schema
        self.fs, self.root = fsspec.core.url_to_fs(self.uri)

    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def check(self, metadata: dict) -> bool:
        """Whether an earlier run of this job holds the output; refuses one of a different job (a resume
        needs the same corpus, model and result-changing settings)."""
        path = self._path(JOB_FILE)
        if not self.fs.exists(path):
            return False
        earlier = json.loads(self.fs.cat_file(path))
        keys = set(earlier.get("fingerprint", [])) | set(metadata["fingerprint"])
        differs = sorted(k for k in keys if earlier.get(k) != metadata.get(k))
        if differs:
            raise ValueError(
                f"{self.uri} already holds {self.table} of a different job (differs in: "
                f"{', '.join(differs)}); resuming needs the same corpus, model and settings: "
                "use another output"
            )
        return True

    def claim(self, metadata: dict) -> None:
        """Records the job's metadata, unless an earlier run of the same job already did."""
        if not self.check(metadata):
            self.fs.makedirs(self.root, exist_ok=True)
            self.fs.pipe_file(self._path(JOB_FILE), json.dumps(metadata, indent=2).encode())

    def committed_shards(self) -> set[int]:
        names = self.fs.glob(self._path(self.table, "part-*.parquet"))
        return {int(posixpath.basename(n)[len("part-") : -len(".parquet")]) for n in names}

    def commit(self, index: int, table: pa.Table, metadata: dict) -> tuple[pa.Table, pa.Table]:
        """Writes a complete shard: its errors first, then its rows, whose file marks it done."""
        table = table.sort_by([("image_id", "ascending"), ("view", "ascending")])
        failed = pc.is_valid(table.column("error"))
        errors = table.filter(failed).select(["image_id", "uri", "error"]).rename_columns(ERRORS_SCHEMA.names)
        rows = table.filter(pc.invert(failed)).select(self.schema.names)
        kv = {"ltrp": json.dumps(metadata)}
        self._write(
            self._path("errors", f"part-{index:05d}.parquet"), errors.cast(ERRORS_SCHEMA.with_metadata(kv))
        )
        self._write(
            self._path(self.table, f"part-{index:05d}.parquet"), rows.cast(self.schema.with_metadata(kv))
        )
        return rows, errors

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


@dataclass(frozen=True)
class Written:
    """What `commit_all` committed: images with rows, rows, and error rows."""

    images: int = 0
    rows: int = 0
    errors: int = 0


def commit_all(
    out: ShardedOutput,
    job: str,
    metadata: dict,
    shards: Sequence[Shard],
    batches_for: Callable[[list[Shard]], Iterable[pa.Table]],
    progress: Callable[[str], None] = print,
) -> tuple[int, Written]:
    """Runs a job on its output: holds the output's lease throughout (one job at a time), records the
    job's metadata (or checks an earlier run's), commits each shard not yet committed as the model
    stage's batches for them complete, reporting each commit, and marks the output finished.

    Args:
        job: names the job in the lease, for a job that finds the output taken.
        batches_for: the model stage's batches of the given pending shards, in any order.

    Returns:
        (shards skipped as already committed, what this run committed).

    Raises:
        LeaseHeld: another live job holds the output (before any work), or took it over meanwhile.
    """
    with Lease(out.uri, job) as lease:
        out.claim(metadata)
        done = out.committed_shards()
        pending = [s for s in shards if s.index not in done]
        images, rows, errors = 0, 0, 0
        for count, (index, table) in enumerate(assemble_shards(batches_for(pending) if pending else []), 1):
            lease.check()
            kept, failed = out.commit(index, table, metadata)
            images += len(set(kept.column("image_id").to_pylist()))
            rows += kept.num_rows
            errors += failed.num_rows
            progress(f"committed shard {index} ({count}/{len(pending)} of this run): {images} images, "
                     f"{errors} errors")  # fmt: skip
        out.finish(len(shards))
    return len(shards) - len(pending), Written(images, rows, errors)
