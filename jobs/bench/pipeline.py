"""Benchmark: the scoring job end to end (list, read, decode, score, commit) against the scoring kernel
alone, same model, same machine, same batch size, one run.

    python -m jobs.bench.pipeline                              # CPU: MAE-B, 32 JPEGs
    python -m jobs.bench.pipeline --images 4096 --batch-size 128 --precision fp16   # on a GPU node

The corpus is JPEGs at ImageNet-like sizes (longer side 500 px, quality 90), cut at random from
scikit-image's photos. Random MAE weights: speed does not depend on them. Prints one line per figure.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray
import torch
import tyro

import ltrp
from jobs.bench.jpegs import imagenet_sized_jpegs
from ltrp.core.leave_one_out import AUTOCAST_DTYPES
from ltrp.core.options import MAEGeometry, Precision
from ltrp.data.datasets import SAMPLE_PHOTOS
from ltrp.data.images import center_crop, to_model_input
from ltrp.pipeline.configs import ScoreConfig
from ltrp.pipeline.score_job import ScoreJob


@dataclass
class PipelineBenchConfig:
    """The scoring job end to end against the scoring kernel alone, side by side."""

    geometry: MAEGeometry = "mae_vit_base_patch16"  # the MAE (random weights: speed does not depend on them)
    images: int = 32  # JPEGs in the corpus
    batch_size: int = 8  # views per scoring call
    precision: Precision = "fp32"  # scoring arithmetic (fp16/bf16 need a GPU)


def write_jpegs(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` JPEGs of about 500 x 375 px, each a random crop of a sample photo."""
    paths = []
    for i, data in enumerate(imagenet_sized_jpegs(count, SAMPLE_PHOTOS, seed)):
        paths.append(folder / f"{i:05d}.jpg")
        paths[-1].write_bytes(data)
    return paths


def steady_images_per_second(scores: Path) -> float:
    """Images per second between the first and the last shard commit (file times): the rate once
    workers are up and the model loaded."""
    parts = sorted(scores.glob("part-*.parquet"), key=lambda p: p.stat().st_mtime)
    images = sum(pq.read_metadata(p).num_rows for p in parts[1:])
    return images / (parts[-1].stat().st_mtime - parts[0].stat().st_mtime)


def kernel_images_per_second(mae: ltrp.MAE, paths: list[Path], cfg: PipelineBenchConfig) -> float:
    """Scoring alone: images decoded beforehand, batches already on the device."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mae = mae.to(device)
    size, grid = mae.cfg.img_size, mae.cfg.grid
    data = [p.read_bytes() for p in paths]
    pixels = np.stack([center_crop(d, size) for d in data])
    batches = [
        (
            to_model_input(torch.from_numpy(pixels[i : i + cfg.batch_size])).to(device),
            ltrp.visible_sets([p.name for p in paths[i : i + cfg.batch_size]], grid=grid).to(device),
        )
        for i in range(0, len(paths), cfg.batch_size)
    ]
    ltrp.loo_scores(mae, *batches[0], autocast_dtype=AUTOCAST_DTYPES[cfg.precision])  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for images, visible in batches:
        ltrp.loo_scores(mae, images, visible, autocast_dtype=AUTOCAST_DTYPES[cfg.precision])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(paths) / (time.perf_counter() - start)


def main() -> None:
    cfg = tyro.cli(PipelineBenchConfig, prog="python -m jobs.bench.pipeline", description=__doc__)

    torch.manual_seed(0)
    mae = ltrp.MAE(ltrp.GEOMETRIES[cfg.geometry]).eval()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "jpegs").mkdir()
        paths = write_jpegs(root / "jpegs", cfg.images)
        ltrp.save_mae(mae, str(root / "mae.pth"))
        ray.init()
        job = ScoreConfig(
            source=str(root / "jpegs"),
            mae=str(root / "mae.pth"),
            output=str(root / "out"),
            batch_size=cfg.batch_size,
            precision=cfg.precision,
            shard_size=cfg.batch_size,
            file_shards=1,  # a file per shard: its time is the shard's commit, which is what is measured
        )
        end_to_end = ScoreJob(job).write().images_per_second
        steady = steady_images_per_second(root / "out" / "scores")
        ray.shutdown()  # the kernel gets the machine to itself
        kernel = kernel_images_per_second(mae, paths, cfg)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tag = f"pipeline {cfg.geometry} {device} {cfg.precision} batch={cfg.batch_size} images={cfg.images}"
    print(f"{tag}: end to end {end_to_end:.2f} img/s (Ray startup, model loads and commits included)")
    print(f"{tag}: end to end, steady {steady:.2f} img/s (from the first shard's commit to the last's)")
    print(f"{tag}: kernel only {kernel:.2f} img/s")
    print(f"{tag}: end to end / kernel {end_to_end / kernel:.2f}, steady / kernel {steady / kernel:.2f}")


if __name__ == "__main__":
    main()
