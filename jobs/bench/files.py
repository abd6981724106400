"""Benchmark: the scoring job's output files, a file per shard against a file per group of shards.

    python -m jobs.bench.files                       # 64 shards of 256 images, 1 view; local and S3
    python -m jobs.bench.files --views 8 --file-shards 16

Writes the same synthetic score table twice per storage (a local folder, and moto's S3 server on
127.0.0.1 started in this process), through `ShardedOutput` as the commit tasks do: every shard
committed, each group combined once its shards are in. Once with `file_shards` 1 (a file per shard,
what the jobs wrote before) and once with --file-shards. Rows as the scoring job writes them at the
defaults (19 visible positions of 196 with their scores, random values). Prints per layout and storage:
files in the table, mean file size, seconds to commit the shards and to combine the groups (each as
rows/s), and seconds to scan the whole table back (`ltrp.read_scores`: every column; the best of 3),
the figure query engines care about. One run; moto's speed is not S3's.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import s3fs
import tyro

import ltrp
from jobs.bench.planning import start_moto
from ltrp.data.tables import SCORES_SCHEMA
from ltrp.pipeline.shards import FileGroups, ShardedOutput

BUCKET = "bench-files"


@dataclass
class FilesBenchConfig:
    """A file per shard against a file per group of shards."""

    shards: int = 64  # shards in the table
    shard_size: int = 256  # images per shard
    views: int = 1  # rows per image
    file_shards: int = 64  # shards per file in the grouped layout
    visible: int = 19  # scored positions per row (19 of 196 at the default mask ratio 0.9)


def shard_rows(index: int, cfg: FilesBenchConfig, rng: np.random.Generator) -> pa.Table:
    """Shard `index`'s rows as the commit stage receives them (no errors)."""
    rows = cfg.shard_size * cfg.views
    ids = [f"cls{index % 10}/img{index * cfg.shard_size + i // cfg.views:08d}.jpg" for i in range(rows)]
    visible = np.sort(
        rng.permuted(np.tile(np.arange(196, dtype=np.int16), (rows, 1)), axis=1)[:, : cfg.visible]
    )
    return pa.table(
        {
            "image_id": ids,
            "uri": [f"s3://corpus/{i}" for i in ids],
            "label": [i.split("/")[0] for i in ids],
            "view": pa.array(np.tile(np.arange(cfg.views), cfg.shard_size), pa.int16()),
            "crop_box": pa.array([[0.0, 0.0, 500.0, 375.0]] * rows, SCORES_SCHEMA.field("crop_box").type),
            "flip": [False] * rows,
            "visible": pa.array(list(visible), SCORES_SCHEMA.field("visible").type),
            "scores": pa.array(
                list(rng.random((rows, cfg.visible), np.float32)), SCORES_SCHEMA.field("scores").type
            ),
            "error": pa.nulls(rows, pa.string()),
        }
    )


def write_table(uri: str, file_shards: int, tables: list[pa.Table]) -> dict[str, float]:
    """Commits `tables` as shards and combines their groups; returns what the bench prints."""
    metadata = {"fingerprint": ["bench"], "bench": True}
    out = ShardedOutput(uri, "scores", SCORES_SCHEMA, FileGroups(file_shards, len(tables)))
    out.claim(metadata)
    start = time.perf_counter()
    for index, table in enumerate(tables):
        out.commit(index, table, metadata)
    committed = time.perf_counter()
    for group in range(out.groups.of(len(tables) - 1) + 1):
        out.combine(group)
    combined = time.perf_counter()
    out.finish(len(tables))
    read, rows = math.inf, 0
    for _ in range(3):  # the best of 3: the first pays for imports and cold caches
        start_read = time.perf_counter()
        rows = ltrp.read_scores(uri).num_rows
        read = min(read, time.perf_counter() - start_read)
    files = out.fs.ls(f"{out.root}/scores", detail=True)
    return {
        "files": len(files),
        "mean file MB": sum(f["size"] for f in files) / len(files) / 1e6,
        "commit s": committed - start,
        "combine s": combined - committed,
        "scan s": read,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> None:
    cfg = tyro.cli(FilesBenchConfig, args=argv, prog="python -m jobs.bench.files", description=__doc__)
    rng = np.random.default_rng(0)
    tables = [shard_rows(i, cfg, rng) for i in range(cfg.shards)]
    server = start_moto()
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(BUCKET)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for storage, root in (("local", tmp), ("s3", f"s3://{BUCKET}")):
                for file_shards in (1, cfg.file_shards):
                    f = write_table(f"{root}/f{file_shards}", file_shards, tables)
                    combine = f"combine {f['combine s']:.2f} s" + (
                        f" ({f['rows'] / f['combine s']:,.0f} rows/s)" if file_shards > 1 else ""
                    )
                    print(
                        f"files {storage} file_shards={file_shards}: {f['files']} files of "
                        f"{f['mean file MB']:.3f} MB; commit {f['commit s']:.2f} s "
                        f"({f['rows'] / f['commit s']:,.0f} rows/s); {combine}; "
                        f"scan {f['scan s']:.3f} s ({f['rows']:,} rows)",
                        flush=True,
                    )
    finally:
        server.stop()


if __name__ == "__main__":
    main()
