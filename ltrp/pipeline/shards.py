"""What every job that maps an image corpus to a table shares (the scoring and the ranking job): the
decode stage (shards -> one row per view with its pixels, or the reason an image cannot be used), the
commit stage (a model stage's rows -> each shard committed, on the workers, once all its rows are in),
and the output folder that commits each shard exactly once.

A shard's file appears whole or not at all, so a re-run skips finished shards, redoes unfinished ones,
and the table never holds a duplicate or a gap. (Ray's own `write_parquet` names files by task and
cannot resume like this; its checkpointing filters rows at read time and may write a block twice.)
No row passes through the driver: the commit stage stages each batch's rows of a shard as a part
file, and whichever commit task completes a shard writes its file and sends the driver one small
manifest row.

Output files are sized for query engines, not by the unit of commit: each file holds a group of
consecutive shards (`FileGroups`, `--file-shards`), combined by whichever commit task finds the group's
last shard committed. A committed shard whose group is not complete waits under `_shards/`, which
readers and query engines skip (a leading underscore), so the table never shows a row twice, even
while a group is being combined or after a crash in the middle of it.

Output under OUTPUT (local path or s3://...):
    TABLE/part-00000.parquet ...   the job's rows (TABLE: "scores", "ranks"), one file per group of shards
    _errors/part-00000.parquet ... images that could not be used: image_id, uri, reason (likewise)
    _ltrp_job.json                 the job's metadata, also in every file's Parquet key-value metadata
    _SUCCESS                       written once every shard is committed and every group combined
    _shards/00000/TABLE/00017.parquet  a committed shard of an incomplete group (and _errors/ beside it)
    _parts/00017/ROWS-DIGEST.arrow  a shard's rows while it is incomplete (removed when committed)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import posixpath
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from ltrp.core.options import Crop
from ltrp.data.images import (
    ImageDecodeError,
    ImageLimits,
    displayed_size,
    render_views,
    to_model_input,
    view_geometry,
)
from ltrp.data.sources import Shard, SourceImage, read_shard
from ltrp.data.tables import (
    ERRORS,
    ERRORS_SCHEMA,
    JOB_FILE,
    PART_FILES,
    PARTS_DIR,
    SCORES_SCHEMA,
    SHARDS_DIR,
    SUCCESS_FILE,
    part_file,
)
from ltrp.pipeline.lease import Lease, check_holder
from ltrp.pipeline.stages import Stage

if TYPE_CHECKING:
    import torch

#: The view columns every job's table starts with (the score table's first six).
VIEW_COLUMNS = list(SCORES_SCHEMA)[:6]
#: What the commit stage sends the driver: one row per shard it committed.
MANIFEST_SCHEMA = pa.schema(
    [("shard", pa.int32()), ("images", pa.int64()), ("rows", pa.int64()), ("errors", pa.int64())]
)


def stage_schema(*columns: pa.Field) -> pa.Schema:
    """The rows between the decode and the model stage: where each belongs (shard, how many rows the
    shard has, so that the commit stage knows when it is complete, and the row's number in it, so
    that a row delivered twice counts once), the view, the job's own input columns, the pixels, and
    the error of an image that cannot be used."""
    return pa.schema(
        [
            ("shard", pa.int32()),
            ("shard_rows", pa.int32()),
            ("shard_row", pa.int32()),
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
    geometries = [
        view_geometry(image.image_id, v, width, height, seed=cfg.seed, crop=cfg.crop, flip=cfg.flip)
        for v in geometry_views
    ]
    # One decode for all the views that share a JPEG reduction: the pixels render_view gives each alone.
    pixels = render_views(image.data, geometries, size, limits)
    return [
        {
            "image_id": image.image_id,
            "uri": image.uri,
            "label": image.label,
            "view": view,
            "crop_box": list(geometry.box),
            "flip": geometry.flip,
            "pixels": rendered.tobytes(),
            "error": None,
        }
        for view, (geometry, rendered) in enumerate(zip(geometries, pixels, strict=True))
    ]


def decode_shards(
    batch: dict[str, np.ndarray], image_rows: Callable[[SourceImage], list[dict]], schema: pa.Schema
) -> pa.Table:
    """Decode stage: shard descriptors -> `image_rows(image)` for each image of each shard, or one
    error row for an image it refuses (ImageDecodeError). Every row carries its shard's row count and
    its number in the shard."""
    rows = []
    for text in batch["shard"]:
        shard = Shard.from_json(str(text))
        shard_rows = [row for image in read_shard(shard) for row in _rows_or_error(image, image_rows)]
        if not shard_rows:  # still commit the shard, so that it counts as done
            empty = SourceImage(shard.tar or str(shard.index), shard.tar or "", None)
            shard_rows = [_error_row(empty, "shard holds no images")]
        rows += [
            {**row, "shard": shard.index, "shard_rows": len(shard_rows), "shard_row": i}
            for i, row in enumerate(shard_rows)
        ]
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
    import torch  # here: the decode and commit workers import this module and never need torch (~2 CPU-s)

    ok = np.flatnonzero(pc.is_null(batch.column("error")).to_numpy(zero_copy_only=False))
    pixels = np.frombuffer(bytearray(b"".join(batch.column("pixels").take(ok).to_pylist())), np.uint8)
    return ok, to_model_input(torch.from_numpy(pixels.reshape(len(ok), size, size, 3)).to(device))


def commit_shards(batch: pa.Table, out: ShardedOutput, metadata: dict, lease_token: str) -> pa.Table:
    """Commit stage: a model stage's rows, of any shards in any order -> the shards this call completed,
    committed, one `MANIFEST_SCHEMA` row each. A batch's rows of a shard are staged as a part named
    by the rows it holds, so a batch that Ray delivers again (a retried task, a lost node's block
    recomputed) replaces its own part instead of adding one; a shard is committed by whichever call
    finds all its rows staged, after checking that the job still holds the output's lease, and its
    group of shards is combined into one file by whichever call commits the group's last shard."""
    manifests = []
    shard_col = batch.column("shard").to_numpy()
    for index in map(int, np.unique(shard_col)):
        part = batch.filter(pa.array(shard_col == index))
        shard_rows = part.column("shard_rows")[0].as_py()
        table = whole_shard(part, shard_rows)  # all of it in this batch: nothing to stage
        if table is None:
            out.stage(index, part)
            table = out.staged_shard(index, shard_rows)
        if table is None:
            continue
        check_holder(out.uri, lease_token)
        kept, failed = out.commit(index, table, metadata)
        out.drop_staged(index)
        out.combine(out.groups.of(index))
        images = len(set(kept.column("image_id").to_pylist()))
        manifests.append({"shard": index, "images": images, "rows": kept.num_rows, "errors": failed.num_rows})
    return pa.Table.from_pylist(manifests, schema=MANIFEST_SCHEMA)


def whole_shard(rows: pa.Table, shard_rows: int) -> pa.Table | None:
    """`rows` with each of the shard's row numbers once, if they hold all `shard_rows`; else None."""
    _, first = np.unique(rows.column("shard_row").to_numpy(), return_index=True)
    return rows.take(first) if len(first) == shard_rows else None


def decode_stage(
    image_rows: Callable[[SourceImage], list[dict]], columns: Sequence[pa.Field], shard_pixels: int
) -> Stage:
    """The decode stage: CPU tasks, a shard each (`shard_pixels`: the bytes of its views' pixels). A
    task holds the libraries (~0.6 GB measured, torch included) and the shard's pixels four times at
    its peak (the rendered arrays, their bytes, the table, its copy into the object store: Ray Data
    measured 1.7-1.8 GiB at 2,048 views of 224 px, 0.3 GB of pixels): telling Ray keeps it from running
    more decodes than memory allows and, as the options then differ from the model stage's, from fusing
    decoding into the model's actors (decoding must scale on its own CPUs)."""
    return Stage(
        decode_shards,
        batch_size=1,
        batch_format="numpy",
        kwargs={"image_rows": image_rows, "schema": stage_schema(*columns)},
        cpus=1,
        memory=3 * 2**28 + 4 * shard_pixels,
    )


def commit_stage(out: ShardedOutput, metadata: dict, lease_token: str, shard_rows: int) -> Stage:
    """The commit stage: tasks of a quarter CPU (they wait on storage, and must never hold back decoding
    or the model), each taking a shard's worth of rows (`shard_rows`), so that a shard is staged in a
    few parts, not in one per model call. The task that combines a group holds the group's rows once:
    at the defaults (256 shards of 256 images), 14 MB of Arrow per view of each image, measured on the
    rows `jobs.bench.files` makes (19 scored positions each)."""
    return Stage(
        commit_shards,
        batch_size=shard_rows,
        kwargs={"out": out, "metadata": metadata, "lease_token": lease_token},
        cpus=0.25,
    )


@dataclass(frozen=True)
class FileGroups:
    """Which shards share an output file: `size` consecutive shards per file, of `shards` in all (the
    last file may hold fewer)."""

    size: int
    shards: int

    def of(self, index: int) -> int:
        """The group of shard `index`."""
        return index // self.size

    def members(self, group: int) -> range:
        """The shards of `group`."""
        return range(group * self.size, min((group + 1) * self.size, self.shards))


class ShardedOutput:
    """A job's output folder: claims it for one job, commits shards atomically, combines each group of
    committed shards into one file, lists what is done.

    Args:
        uri: the folder, local or s3://.
        table: the folder of the job's rows ("scores", "ranks").
        schema: the rows' schema; a commit selects and casts to it.
        groups: which shards share a file.
    """

    def __init__(self, uri: str, table: str, schema: pa.Schema, groups: FileGroups) -> None:
        self.uri = uri.rstrip("/")
        self.table = table
        self.schema = schema
        self.groups = groups
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
        """The shards committed: those waiting for their group, then (so that a group combined in
        between is seen) those of the groups combined."""
        self.fs.invalidate_cache()  # s3fs caches listings; other processes commit meanwhile
        waiting = self.fs.glob(self._path(SHARDS_DIR, "*", self.table, "*.parquet"))
        return {_number(name) for name in waiting} | self._combined_shards()

    def _combined_shards(self) -> set[int]:
        self.fs.invalidate_cache()  # s3fs caches listings; other processes commit meanwhile
        files = self.fs.glob(self._path(self.table, PART_FILES))
        return {index for name in files for index in self.groups.members(_number(name))}

    def _group_file(self, kind: str, group: int) -> str:
        return self._path(kind, part_file(group))

    def _shard_file(self, kind: str, index: int) -> str:
        return self._path(SHARDS_DIR, f"{self.groups.of(index):05d}", kind, f"{index:05d}.parquet")

    def _is_committed(self, index: int) -> bool:
        group_file = self._group_file(self.table, self.groups.of(index))
        return self.fs.exists(self._shard_file(self.table, index)) or self.fs.exists(group_file)

    def stage(self, index: int, part: pa.Table) -> None:
        """Stages some rows of shard `index` as a part named by their count and their row numbers."""
        numbers = np.sort(part.column("shard_row").to_numpy()).astype("<i4")
        name = f"{part.num_rows}-{hashlib.sha256(numbers.tobytes()).hexdigest()[:24]}.arrow"
        self._write(self._path(PARTS_DIR, f"{index:05d}", name), part)

    def staged_shard(self, index: int, shard_rows: int) -> pa.Table | None:
        """Shard `index`'s rows, each once, if all `shard_rows` are staged and it is not committed yet;
        else None. (Parts may overlap when Ray delivered a row twice in different batches; their names'
        counts then add up to more than the shard holds, and the rows themselves decide.)"""
        folder = self._path(PARTS_DIR, f"{index:05d}")
        self.fs.invalidate_cache(folder)
        try:
            names = [posixpath.basename(p) for p in self.fs.ls(folder, detail=False)]
            counts = [int(n.split("-", 1)[0]) for n in names if n.endswith(".arrow") and n[0] != "."]
            if sum(counts) < shard_rows or self._is_committed(index):
                return None
            parts = [self._read_part(posixpath.join(folder, n)) for n in names if n.endswith(".arrow")]
        except FileNotFoundError:  # none staged yet, or another call committed it and removed them
            return None
        return whole_shard(pa.concat_tables(parts), shard_rows)

    def drop_staged(self, index: int) -> None:
        self._remove(self._path(PARTS_DIR, f"{index:05d}"))

    def drop_all_staged(self) -> None:
        """Removes every staged part: an interrupted run's, whose shards a re-run redoes whole."""
        self._remove(self._path(PARTS_DIR))

    def _remove(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(path, recursive=True)

    def commit(self, index: int, table: pa.Table, metadata: dict) -> tuple[pa.Table, pa.Table]:
        """Writes a complete shard: its errors first, then its rows, whose file marks it done. A shard
        alone in its group is written as the group's file; any other waits under `_shards/`."""
        table = table.sort_by([("image_id", "ascending"), ("view", "ascending")])
        failed = pc.is_valid(table.column("error"))
        errors = table.filter(failed).select(["image_id", "uri", "error"]).rename_columns(ERRORS_SCHEMA.names)
        rows = table.filter(pc.invert(failed)).select(self.schema.names)
        kv = {"ltrp": json.dumps(metadata)}
        group = self.groups.of(index)
        alone = len(self.groups.members(group)) == 1
        for kind, data, schema in ((ERRORS, errors, ERRORS_SCHEMA), (self.table, rows, self.schema)):
            path = self._group_file(kind, group) if alone else self._shard_file(kind, index)
            self._write(path, data.cast(schema.with_metadata(kv)))
        return rows, errors

    def combine(self, group: int) -> None:
        """Combines the shards of `group` into its files (errors first, then rows, whose file marks the
        group done) and removes them from `_shards/`, once all are committed; else does nothing. Two
        calls may race: both write the same bytes, and one that finds the shards gone stops."""
        members = self.groups.members(group)
        if len(members) == 1:
            return
        folder = self._path(SHARDS_DIR, f"{group:05d}")
        try:
            self.fs.invalidate_cache(folder)
            names = self.fs.ls(posixpath.join(folder, self.table), detail=False)
            if len([n for n in names if n.endswith(".parquet")]) < len(members):
                return
            tables = {
                kind: pa.concat_tables([self._read_shard(self._shard_file(kind, i)) for i in members])
                for kind in (ERRORS, self.table)
            }
        except FileNotFoundError:  # nothing committed yet, or another call combined them
            return
        for kind, table in tables.items():  # the first shard's schema carries the job's metadata
            self._write(self._group_file(kind, group), table)
        self._remove(folder)

    def combine_left_over(self) -> None:
        """Combines the complete groups an interrupted run left uncombined (it died between a shard's
        commit and its group's) and removes shards a crash left behind a combined group's file."""
        self.fs.invalidate_cache()
        for folder in self.fs.glob(self._path(SHARDS_DIR, "*")):
            group = _number(folder)
            if self.fs.exists(self._group_file(self.table, group)):
                self._remove(folder)
            else:
                self.combine(group)

    def finish(self, shards: int) -> None:
        """Combines what an interrupted run left, checks that all `shards` are committed, and marks the
        output done."""
        self.combine_left_over()
        done = self._combined_shards()
        if len(done) != shards:
            raise RuntimeError(f"{self.uri}: {shards - len(done)} of {shards} shards are not committed")
        self.drop_all_staged()  # leftovers of rows delivered twice after their shard was committed
        self._remove(self._path(SHARDS_DIR))  # every group is combined: what is left there is in its file
        self.fs.pipe_file(self._path(SUCCESS_FILE), b"")

    def _read_shard(self, path: str) -> pa.Table:
        with self.fs.open(path, "rb") as f:
            return pq.read_table(f)

    def _read_part(self, path: str) -> pa.Table:
        with self.fs.open(path, "rb") as f:
            return pa.ipc.open_file(f).read_all()

    def _write(self, path: str, table: pa.Table) -> None:
        """Writes `table` atomically as Parquet, or as Arrow IPC for a staged part (.arrow), which keeps
        every column exactly as the stage made it (Parquet cannot read back a null fixed-size list)."""
        sink = pa.BufferOutputStream()
        if path.endswith(".arrow"):
            with pa.ipc.new_file(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as w:
                w.write_table(table)
        else:
            pq.write_table(table, sink, compression="zstd")
        data = sink.getvalue().to_pybytes()
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        if isinstance(self.fs, LocalFileSystem):  # a rename is atomic; readers skip dot-files
            tmp = posixpath.join(posixpath.dirname(path), f".{uuid.uuid4().hex}.tmp")
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, path)
        else:  # an object store shows a PUT whole or not at all
            self.fs.pipe_file(path, data)


def _number(path: str) -> int:
    """The number in a file or folder name: part-00003.parquet, 00003.parquet, 00003 -> 3."""
    return int(posixpath.basename(path).removeprefix("part-").removesuffix(".parquet"))


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
    manifests_for: Callable[[list[Shard], str], Iterable[dict]],
    progress: Callable[[str], None] = print,
) -> tuple[int, Written]:
    """Runs a job on its output: holds the output's lease throughout (one job at a time), records the
    job's metadata (or checks an earlier run's), has the pending shards committed by the workers'
    commit stage, reporting each commit, and marks the output finished.

    Args:
        job: names the job in the lease, for a job that finds the output taken.
        manifests_for: runs the job's stages on the given pending shards, with commit stages that check
            the lease token given; yields their `MANIFEST_SCHEMA` rows as shards are committed.

    Returns:
        (shards skipped as already committed, what this run committed).

    Raises:
        LeaseHeld: another live job holds the output (before any work), or took it over meanwhile.
    """
    with Lease(out.uri, job) as lease:
        out.claim(metadata)
        out.drop_all_staged()
        done = out.committed_shards()
        pending = [s for s in shards if s.index not in done]
        committed: set[int] = set()
        images, rows, errors = 0, 0, 0
        for manifest in manifests_for(pending, lease.token) if pending else []:
            lease.check()
            if manifest["shard"] in committed:  # two commit tasks both completed it: the same file
                continue
            committed.add(manifest["shard"])
            images, rows, errors = (images + manifest["images"], rows + manifest["rows"],
                                    errors + manifest["errors"])  # fmt: skip
            progress(f"committed shard {manifest['shard']} ({len(committed)}/{len(pending)} of this run): "
                     f"{images} images, {errors} errors")  # fmt: skip
        out.finish(len(shards))
    return len(shards) - len(pending), Written(images, rows, errors)
