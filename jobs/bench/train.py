"""Benchmark: where a ranker training step's time goes, side by side in one run.

    python -m jobs.bench.train                       # CPU: ViT-S/16, batch 32
    python -m jobs.bench.train --batch-size 512      # on a GPU machine (bf16 autocast there)

Prints images/s of: the asymmetric training step (CLS + 19 visible tokens, forward + backward + AdamW),
the same step on all 196 tokens, and views/s of loading the training's views on one CPU core, two ways:
    replay, an image's views     `training_data.load_views`: an image's K views share one read and decode
    cached pixels                the same views rendered once, stored as uint8 in Parquet (zstd or none), read
                                 back (its bytes per view on disk are printed beside the JPEGs' per image;
                                 a cache also ties the table to one view size)
and how many such cores keep the asymmetric step busy, so one can see whether the accelerator or the
data is the bottleneck. K random views (RandomResizedCrop geometry, flips) of ImageNet-sized JPEGs.
Random weights and data for the step: speed does not depend on them. (Each view replayed alone, what
training did before commit bb51ff2, was measured beside these until commit d29cc9d: docs/benchmarks.md.)
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import tyro

import ltrp
from jobs.bench.pipeline import write_jpegs
from ltrp.core.losses import listmle
from ltrp.core.optim import param_groups
from ltrp.core.options import RankerGeometry
from ltrp.core.ranker import RANKER_GEOMETRIES, Ranker
from ltrp.data.images import displayed_size, view_geometry
from ltrp.data.tables import SCORES_SCHEMA
from ltrp.pipeline.training_data import load_views


def step_images_per_second(model: Ranker, batch: int, visible: torch.Tensor | None, steps: int) -> float:
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95))
    images = torch.randn(batch, 3, model.cfg.img_size, model.cfg.img_size, device=device)
    n = model.cfg.num_patches if visible is None else visible.shape[1]
    targets = torch.rand(batch, n, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        with autocast:
            s = model(images, visible)
        loss = listmle(s.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def score_rows(folder: Path, images: int, views: int) -> pa.Table:
    """Score-table rows of `views` random views of each of `images` JPEGs written under `folder`."""
    rows = []
    for path in write_jpegs(folder, images):
        width, height = displayed_size(path.read_bytes())
        for v in range(views):
            view = view_geometry(path.name, v, width, height, crop="random", flip=True)
            rows.append({"image_id": path.name, "uri": str(path), "view": v, "crop_box": list(view.box),
                         "flip": view.flip, "visible": [0], "scores": [0.0]})  # fmt: skip
    return pa.Table.from_pylist(rows, schema=SCORES_SCHEMA)


def views_per_second(load: Callable[[pa.Table], object], rows: pa.Table, batch: int) -> float:
    start = time.perf_counter()
    for offset in range(0, rows.num_rows, batch):
        load(rows.slice(offset, batch))
    return rows.num_rows / (time.perf_counter() - start)


def cached_views_per_second(
    pixels: np.ndarray, batch: int, folder: Path, compression: Literal["zstd", "none"]
) -> tuple[float, float]:
    """(views/s, bytes per view on disk) of reading `pixels` (N, S, S, 3) back from a Parquet cache of
    one uint8 column, a row group per batch."""
    cache = folder / f"views-{compression}.parquet"
    buffer = pa.py_buffer(np.ascontiguousarray(pixels))
    column = pa.FixedSizeBinaryArray.from_buffers(pa.binary(pixels[0].nbytes), len(pixels), [None, buffer])
    pq.write_table(pa.table({"image": column}), cache, compression=compression, row_group_size=batch)
    cached = pq.ParquetFile(cache)
    start = time.perf_counter()
    for group in range(cached.num_row_groups):
        images = cached.read_row_group(group, use_threads=False).column("image").combine_chunks()
        np.frombuffer(images.buffers()[1], np.uint8).reshape(-1, *pixels.shape[1:])
    return len(pixels) / (time.perf_counter() - start), cache.stat().st_size / len(pixels)


@dataclass
class BenchConfig:
    """A ranker training step's time: the asymmetric step, the full step, and loading the views."""

    ranker: RankerGeometry = "ltrp_vit_small_patch16"  # ranker size and patch grid
    batch_size: int = 32  # views per step
    steps: int = 3  # timed steps per figure
    images: int = 32  # JPEGs whose views are loaded
    views: int = 8  # views per image (K)


def main(argv: list[str] | None = None) -> None:
    cfg = tyro.cli(BenchConfig, args=argv, prog="python -m jobs.bench.train", description=__doc__)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = Ranker(RANKER_GEOMETRIES[cfg.ranker]).to(device).train()
    grid, size = model.cfg.grid, model.cfg.img_size
    visible = ltrp.visible_sets(range(cfg.batch_size), grid=grid).to(device)
    tag = f"train {cfg.ranker} {device.type} batch={cfg.batch_size}"
    step = step_images_per_second(model, cfg.batch_size, visible, cfg.steps)
    print(f"{tag}: asymmetric step (CLS + {visible.shape[1]} tokens) {step:.1f} img/s", flush=True)
    print(
        f"{tag}: full step (all {grid * grid} tokens) "
        f"{step_images_per_second(model, cfg.batch_size, None, cfg.steps):.1f} img/s",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        rows = score_rows(Path(tmp), cfg.images, cfg.views)
        loading = {
            "replay, an image's views": views_per_second(
                partial(load_views, size=size), rows, cfg.batch_size
            ),
        }
        pixels = load_views(rows, size)["image"]
        cached_bytes = {}
        for compression in ("zstd", "none"):
            rate, cached_bytes[compression] = cached_views_per_second(
                pixels, cfg.batch_size, Path(tmp), compression
            )
            loading[f"cached pixels ({compression})"] = rate
        jpeg_bytes = sum(p.stat().st_size for p in Path(tmp).glob("*.jpg")) / cfg.images
    for way, rate in loading.items():
        print(
            f"{tag}: loading {cfg.views} views per JPEG, {way}: {rate:.1f} views/s on one core, "
            f"{step / rate:.2f} cores per asymmetric step"
        )
    cached = ", ".join(f"{c} {b / 1e3:.0f} kB" for c, b in cached_bytes.items())
    disk = f"cached pixels per view {cached}; JPEGs {jpeg_bytes / 1e3:.0f} kB per image"
    print(f"{tag}: on disk: {disk}")


if __name__ == "__main__":
    main()
