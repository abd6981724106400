"""Helpers shared by the tests (and nothing else: fixtures and hooks live in conftest.py).

Tests import them as `from support import ...`: pytest puts tests/ on sys.path for its rootdir conftest.
"""

from __future__ import annotations

import dataclasses
import json
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import ltrp
from ltrp.core.ranker import RankerConfig
from ltrp.data.datasets import read_fashion_mnist
from ltrp.data.images import center_crop, center_view, displayed_size, png_bytes, to_model_input
from ltrp.data.sources import Shard, plan_corpus, read_shard
from ltrp.data.tables import SCORES_SCHEMA
from ltrp.evaluation.measures import KEEP_RATIOS, Estimate, metric_key, vs_random
from ltrp.local import BIN, free_port, wait_for_port

if TYPE_CHECKING:
    from ltrp.pipeline.configs import ScoreConfig
    from ltrp.pipeline.shards import FileGroups, ShardedOutput

__all__ = [
    "BIN",
    "PRIMARY",
    "SCENE_PRIMARY",
    "SMALL_MAE",
    "SMALL_RANKER",
    "TINY_GRID",
    "TINY_SIZE",
    "committed_files",
    "committed_shards",
    "decode",
    "evaluation",
    "fashion_mnist",
    "fashion_mnist_pngs",
    "free_port",
    "holds_rows",
    "image",
    "job_metadata",
    "pixels",
    "png_bytes",
    "scene_evaluation",
    "score_config",
    "score_in_process",
    "score_output",
    "score_rows",
    "wait_for_port",
    "write_folder",
    "write_shard",
    "write_table",
]


def fashion_mnist(count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` test images (count, 28, 28) uint8 and labels, from Debian's package."""
    try:
        images, labels = read_fashion_mnist("test")
    except FileNotFoundError as err:
        pytest.fail(f"{err} (.ci/run installs it)")
    return images[:count], labels[:count]


def fashion_mnist_pngs(count: int) -> dict[str, bytes]:
    """The first `count` test images as PNGs in ImageFolder layout: {"LABEL/IIII.png": bytes}."""
    images, labels = fashion_mnist(count)
    return {f"{y}/{i:04d}.png": png_bytes(x) for i, (x, y) in enumerate(zip(images, labels, strict=True))}


# Promotion: evaluations as a model version's logged model holds them, {metric key: Estimate}.
PRIMARY = "reconstruction_error.keep25"  # the default policy's primary key without masks
SCENE_PRIMARY = "object_recall.keep25"  # ... and on scenes with object masks


def evaluation(recon: float = 0.040, acc: float = 0.80, width: float = 0.002, **overrides: float) -> dict:
    """Every key the default policy needs without masks: reconstruction_error (lower is better) and
    accuracy (higher) at every keep ratio, and the floor's ranker-minus-random difference on the primary,
    mean +/- `width`; `overrides` set single keys' means, e.g. accuracy_keep50=0.7."""
    means = {metric_key("reconstruction_error", r): recon for r in KEEP_RATIOS}
    means |= {metric_key("accuracy", r): acc for r in KEEP_RATIOS}
    # The floor: the ranker minus random on the primary, clearly below 0 (lower error is better).
    return _estimates(means | {vs_random(PRIMARY): -0.01}, width, overrides)


def scene_evaluation(
    recall: float = 0.6, background: float = 0.2, width: float = 0.01, **overrides: float
) -> dict:
    """Every key the default policy needs on scenes with object masks: object_recall (higher is better)
    and background_share (lower) at every keep ratio, and the floor's ranker-minus-random difference on
    object recall at 25%, mean +/- `width`; `overrides` set single keys' means, e.g.
    object_recall_keep25=0.7."""
    means = {metric_key("object_recall", r): recall for r in KEEP_RATIOS}
    means |= {metric_key("background_share", r): background for r in KEEP_RATIOS}
    # The floor: the ranker minus random on object recall, clearly above 0.
    return _estimates(means | {vs_random(SCENE_PRIMARY): 0.3}, width, overrides)


def _estimates(means: dict[str, float], width: float, overrides: dict[str, float]) -> dict:
    """{key: Estimate(mean, mean - width, mean + width)}, `overrides` (accuracy_keep50=...) replacing
    single means."""
    means = means | {k.replace("_keep", ".keep"): v for k, v in overrides.items()}
    return {k: Estimate(m, m - width, m + width) for k, m in means.items()}


# Evaluation inputs: labelled folders and score tables as the scoring job writes them.
# A 32 px MAE and ranker on the 8x8 grid of "mae_vit_fmnist_patch4", small enough for tests.
SMALL_MAE = ltrp.MAEConfig(
    img_size=32,
    patch_size=4,
    embed_dim=32,
    depth=1,
    num_heads=2,
    decoder_embed_dim=32,
    decoder_depth=1,
    decoder_num_heads=2,
)
SMALL_RANKER = RankerConfig(img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2)


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray, first: int = 0) -> Path:
    """Images as PNGs in ImageFolder layout: root/LABEL/NNNN.png, numbered from `first`."""
    for i, (x, y) in enumerate(zip(images, labels, strict=True)):
        path = root / str(y) / f"{first + i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png_bytes(x))
    return root


def score_rows(source: Path, mae: ltrp.MAE, mask_ratio: float = 0.75) -> list[dict]:
    """Score-table rows for a folder's central squares, as the scoring job writes them."""
    items = [img for shard in plan_corpus(str(source), 1 << 20).shards for img in read_shard(shard)]
    pixels = np.stack([center_crop(img.data, mae.cfg.img_size) for img in items])
    visible = ltrp.visible_sets([img.image_id for img in items], grid=mae.cfg.grid, mask_ratio=mask_ratio)
    with torch.inference_mode():
        scores = ltrp.loo_scores(mae, to_model_input(pixels), visible)
    return [
        {
            "image_id": img.image_id,
            "uri": img.uri,
            "label": img.label,
            "view": 0,
            "crop_box": list(center_view(*displayed_size(img.data)).box),
            "flip": False,
            "visible": vis.tolist(),
            "scores": sc.tolist(),
        }
        for img, vis, sc in zip(items, visible, scores, strict=True)
    ]


def score_in_process(cfg: ScoreConfig) -> None:
    """The scoring job's table, by its own stages run in this process (`stages.run_in_process`): what
    `score_job.run(cfg)` writes, without Ray Data's workers (~50 s here) or an MLflow run, for tests
    that only need a table (the job itself: test_score_job.py)."""
    # Imported here: the pipeline loads Ray, which the core, data and evaluation tests do without.
    from ltrp.pipeline.score_job import ScoreJob
    from ltrp.pipeline.stages import run_in_process

    ScoreJob(cfg).write(run_in_process, progress=lambda _: None)


def write_table(root: Path, rows: list[dict]) -> Path:
    """A score table as the scoring job lays it out: root/_ltrp_job.json, root/scores/part-00000.parquet."""
    (root / "scores").mkdir(parents=True, exist_ok=True)
    (root / "_ltrp_job.json").write_text(json.dumps({"fingerprint": []}))
    pq.write_table(pa.Table.from_pylist(rows, schema=SCORES_SCHEMA), root / "scores" / "part-00000.parquet")
    return root


# The scoring job's stages on the tiny MAE ("mae_vit_tiny_patch8"), without Ray: test_score_stages.py and
# test_shards.py. The pipeline is imported in the functions: it loads Ray, which other tests do without.
TINY_SIZE, TINY_GRID = 64, 8  # the tiny MAE's image size and patch grid


def image(seed: int, height: int, width: int, gray: bool = False) -> bytes:
    """A PNG of random pixels from `seed`, height x width, RGB or `gray`."""
    rng = np.random.default_rng(seed)
    shape = (height, width) if gray else (height, width, 3)
    return png_bytes(rng.integers(0, 256, shape, dtype=np.uint8))


def write_shard(folder: Path, index: int, files: dict[str, bytes | None]) -> Shard:
    """A shard of the named files, written under `folder` (None: a file that does not exist)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        if data is not None:
            (folder / name).write_bytes(data)
    names = list(files)
    return Shard(index, tuple(names), tuple(str(folder / n) for n in names), tuple(f"L{n[0]}" for n in names))


def score_config(tmp_path: Path, mae: str = "unused.pth", **changes: object) -> ScoreConfig:
    """A ScoreConfig of the corpus at `tmp_path`, writing to tmp_path/out, with `changes`."""
    from ltrp.pipeline.configs import ScoreConfig

    return ScoreConfig(**{"source": str(tmp_path), "mae": mae, "output": str(tmp_path / "out"), **changes})


def decode(cfg: ScoreConfig, *shards: Shard) -> pa.Table:
    """The scoring job's decode stage's rows of `shards`, at the tiny MAE's size and grid."""
    from ltrp.pipeline.score_stages import COLUMNS, image_rows
    from ltrp.pipeline.shards import decode_shards, stage_schema

    # As Ray's numpy batches hold it: one shard descriptor per row, as an object array of str.
    batch = {"shard": np.array([s.to_json() for s in shards], dtype=object)}
    rows = partial(image_rows, cfg=cfg, size=TINY_SIZE, grid=TINY_GRID)
    return decode_shards(batch, rows, stage_schema(*COLUMNS))


def pixels(row: dict) -> np.ndarray:
    """A decoded row's pixels as an image: (TINY_SIZE, TINY_SIZE, 3) uint8."""
    return np.frombuffer(row["pixels"], np.uint8).reshape(TINY_SIZE, TINY_SIZE, 3)


def score_output(uri: str, groups: FileGroups) -> ShardedOutput:
    """The scoring job's output folder at `uri`, its shards' files grouped by `groups`."""
    from ltrp.pipeline.shards import ShardedOutput

    return ShardedOutput(uri, "scores", SCORES_SCHEMA, groups)


def job_metadata(cfg: ScoreConfig) -> dict:
    """The metadata a job of `cfg` records, planned on an output of its own."""
    from ltrp.pipeline.score_job import ScoreJob

    return ScoreJob(dataclasses.replace(cfg, output=cfg.output + "-planned")).metadata


def ray_data_workers() -> set[psutil.Process]:
    """The workers of this process's local Ray cluster (`address="local"`: they descend from it) running a
    Ray Data operator: a worker's title names what it runs, `ray::MapBatches(f)` for a task of operator f,
    `ray::MapWorker(MapBatches(C))` for an actor of its pool. Ray Data's own detached actors
    (`_StatsActor`, ...) outlive the job and are not among them."""
    return {p for p in psutil.Process().children(recursive=True) if _runs_ray_data_operator(p)}


def _runs_ray_data_operator(process: psutil.Process) -> bool:
    try:
        title = process.cmdline()[0]
    except (psutil.Error, IndexError):
        return False
    return title.startswith(("ray::MapBatches(", "ray::MapWorker("))


def wait_for_exit(processes: set[psutil.Process], timeout: float = 60) -> None:
    """Waits until every one of `processes` has exited, failing after `timeout` seconds.

    A job's driver killed with SIGKILL leaves its tasks running until Ray notices and kills them: until
    then they may still commit or combine shards.
    """
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    assert not alive, f"processes still running after {timeout} s: {alive}"


def committed_shards(out: Path, table: str, groups: FileGroups) -> set[int]:
    """The shards a scoring or ranking job's local output holds, read from its files: the members of
    each combined group's file, and the shards under `_shards/` waiting for their group."""
    combined = {i for p in (out / table).glob("part-*.parquet") for i in groups.members(int(p.stem[5:]))}
    return combined | {int(p.stem) for p in out.glob(f"_shards/*/{table}/*.parquet")}


def committed_files(out: Path, table: str) -> dict[Path, pa.Table]:
    """The committed rows of a local job output, by file: combined groups' and waiting shards'."""
    paths = [*(out / table).glob("part-*.parquet"), *out.glob(f"_shards/*/{table}/*.parquet")]
    return {p: pq.read_table(p) for p in paths}


def holds_rows(table: pa.Table, rows: pa.Table) -> bool:
    """Whether every row of `rows` is a row of `table`, values and all."""
    held = table.to_pylist()
    return all(row in held for row in rows.to_pylist())
