"""The score and rank tables: their schemas, and reading them back (plain pyarrow; no Ray needed)."""

from __future__ import annotations

import json
import posixpath

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

SCORES_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("label", pa.string()),
        ("view", pa.int16()),
        ("crop_box", pa.list_(pa.float32(), 4)),  # left, top, right, bottom in displayed source pixels
        ("flip", pa.bool_()),
        ("visible", pa.list_(pa.int16())),
        ("scores", pa.list_(pa.float32())),
    ]
)
#: The ranking job's rows: a ranker's score for every patch position of a view, and the positions in
#: ranked order (best first), in compact types: fp16 scores, int16 positions.
RANKS_SCHEMA = pa.schema(
    [
        *list(SCORES_SCHEMA)[:6],
        ("scores", pa.list_(pa.float16())),  # (L,) in raster order; larger = keep
        ("order", pa.list_(pa.int16())),  # (L,) positions by score, best first (from the fp32 scores)
    ]
)
# The output folder of a corpus job, in one place: `ltrp.pipeline.shards` writes it, the readers here
# read it. Folders and files whose names start with "_" are the job's bookkeeping, which readers and
# query engines skip.
#   SCORES/ or RANKS/  the rows, one part_file() per group of shards
#   ERRORS/            images that could not be used (ERRORS_SCHEMA), likewise
#   JOB_FILE           the job's metadata;  SUCCESS_FILE: written once every shard is committed
#   SHARDS_DIR/        committed shards waiting for their group;  PARTS_DIR/: rows of incomplete shards
# Everything but the table starts with "_", which Parquet readers skip (pyarrow, pandas, Polars, Ray Data,
# Spark): reading the root itself gives the table's rows.
SCORES, RANKS, ERRORS = "scores", "ranks", "_errors"
#: The version of this layout, a fingerprint key of every corpus job: an output written with another
#: (before 2, errors/ sat beside the table and a read of the root mixed them in) is not resumed.
OUTPUT_LAYOUT = 2
#: A job's metadata file at the root of its output.
JOB_FILE = "_ltrp_job.json"
SUCCESS_FILE = "_SUCCESS"
SHARDS_DIR, PARTS_DIR = "_shards", "_parts"


PART_FILES = "part-*.parquet"


def part_file(group: int) -> str:
    """The file of a group of shards in a table's folder (one of PART_FILES)."""
    return f"part-{group:05d}.parquet"


ERRORS_SCHEMA = pa.schema([("image_id", pa.string()), ("uri", pa.string()), ("reason", pa.string())])


def read_scores(uri: str, *, columns: list[str] | None = None, filters: list | None = None) -> pa.Table:
    """The score table of a scoring job's output root (local or s3://), optionally with columns and
    row filters (pyarrow's DNF filters, e.g. `[("label", "=", "Bag")]`).

    Raises:
        FileNotFoundError: `uri` is not a scoring job's output (it holds no `_ltrp_job.json`).
        ValueError: a file of the table lacks a column of the score table's schema.
    """
    return _read_table(uri, "score", SCORES, SCORES_SCHEMA, columns, filters)


def read_errors(uri: str) -> pa.Table:
    """The images a scoring or ranking job could not use, with reasons (no rows when every image was used).

    Raises:
        FileNotFoundError: `uri` is not a job's output (it holds no `_ltrp_job.json`).
    """
    fs, root = _job_root(uri)
    path = posixpath.join(root, ERRORS)
    if not fs.exists(path):
        return ERRORS_SCHEMA.empty_table()
    return pq.read_table(path, filesystem=fs, schema=ERRORS_SCHEMA)


def read_ranks(uri: str, *, columns: list[str] | None = None, filters: list | None = None) -> pa.Table:
    """The rank table of a ranking job's output root (local or s3://), optionally with columns and
    row filters (pyarrow's DNF filters, e.g. `[("view", "=", 0)]`).

    Raises:
        FileNotFoundError: `uri` is not a ranking job's output (it holds no `_ltrp_job.json`).
        ValueError: a file of the table lacks a column of the rank table's schema.
    """
    return _read_table(uri, "rank", RANKS, RANKS_SCHEMA, columns, filters)


def _read_table(
    uri: str, job: str, folder: str, schema: pa.Schema, columns: list[str] | None, filters: list | None
) -> pa.Table:
    """The Parquet files of a job's output folder read as `schema`, after checking that each file has
    its columns: read with a schema, a file without one would give nulls in its place, not an error."""
    fs, root = _job_root(uri, job)
    path = posixpath.join(root, folder)
    if not fs.exists(path):  # a job whose first group of shards is not combined yet
        return schema.empty_table().select(columns or schema.names)
    dataset = ds.dataset(path, filesystem=fs, format="parquet", schema=schema)
    for fragment in dataset.get_fragments():
        missing = [name for name in schema.names if name not in fragment.physical_schema.names]
        if missing:
            raise ValueError(
                f"{uri.rstrip('/')}/{folder}/{posixpath.basename(fragment.path)} has no column "
                f"{', '.join(missing)}: not a file of a {job} job's table ({', '.join(schema.names)})"
            )
    expression = None if filters is None else pq.filters_to_expression(filters)
    return dataset.to_table(columns=columns, filter=expression)


def top_k(ranks: pa.Table, ratio: float) -> np.ndarray:
    """The kept positions of each row of a rank table at a keep ratio, as `ltrp.keep_top` gives them
    from the ranker's scores: the round(ratio * L) best positions (at least one), in raster order.

    Args:
        ranks: rows with the column "order" (e.g. `read_ranks(uri, columns=["image_id", "order"])`).
        ratio: fraction of patches kept, in (0, 1].

    Returns:
        (rows, k) int64 positions, row i for row i of `ranks`.
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"keep ratio must be in (0, 1], got {ratio}")
    order = ranks.column("order").combine_chunks()
    length = len(order[0]) if len(order) else 0
    best = order.flatten().to_numpy().reshape(len(order), length).astype(np.int64)
    return np.sort(best[:, : max(1, round(ratio * length))], axis=1)


def arrow_filesystem(uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """The pyarrow filesystem for `uri` (a local path or a URL) and the (absolute) path in it, for
    what takes a pyarrow filesystem (Ray Data's Parquet reads, Ray Train's storage): pyarrow's own for
    local paths, else fsspec's wrapped for pyarrow, as every other storage call of the jobs goes.
    Not pyarrow's S3 client: it gives up after 3 attempts, which a store under load (503 SlowDown, 500,
    dropped connections) exhausts now and then, failing a whole training over one read or checkpoint
    upload, and its retry setting is not pickled to Ray's workers; s3fs retries each request with
    backoff."""
    fs, path = fsspec.core.url_to_fs(uri)
    if isinstance(fs, LocalFileSystem):
        return pyarrow.fs.LocalFileSystem(), path
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), path


def read_job_metadata(uri: str) -> dict:
    """What a scoring or ranking job's output was computed with (model sha256 and geometry, settings): its
    `_ltrp_job.json`.

    Raises:
        FileNotFoundError: `uri` is not a job's output.
    """
    fs, root = _job_root(uri)
    return json.loads(fs.cat_file(posixpath.join(root, JOB_FILE)))


def _job_root(uri: str, job: str = "score") -> tuple[fsspec.AbstractFileSystem, str]:
    fs, root = fsspec.core.url_to_fs(uri.rstrip("/"))
    if not fs.exists(posixpath.join(root, JOB_FILE)):
        raise FileNotFoundError(
            f"{uri} is not the output of a {job} job (no _ltrp_job.json there): give the folder "
            f"that python -m jobs.{job} --output named"
        )
    return fs, root


def position_scores(table: pa.Table, num_patches: int) -> dict[str, np.ndarray]:
    """One score per patch position of each image, from its rows (the full-coverage oracle's reader).

    Each row's scores are rank-normalised within the row (its lowest to 0, its highest to 1, ties
    averaged), so rows of different scales weigh the same; a position's score is the mean over the
    rows that scored it, NaN where none did.

    Args:
        table: score rows ("image_id", "visible", "scores"), e.g. `read_scores` of a `--cover` job.
        num_patches: L, the patch positions of an image.

    Returns:
        image_id -> (L,) float64.
    """
    import scipy.stats  # here, not at the top: ~1 s of every Ray worker's start-up, for this one function

    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    ids = table.column("image_id").to_pylist()
    visible = table.column("visible").to_pylist()
    scores = table.column("scores").to_pylist()
    for image_id, positions, values in zip(ids, visible, scores, strict=True):
        ranks = scipy.stats.rankdata(values) - 1
        normalised = ranks / max(len(values) - 1, 1)
        np.add.at(sums.setdefault(image_id, np.zeros(num_patches)), positions, normalised)
        np.add.at(counts.setdefault(image_id, np.zeros(num_patches)), positions, 1)
    with np.errstate(invalid="ignore"):
        return {i: sums[i] / counts[i] for i in sums}
