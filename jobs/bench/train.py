"""Benchmark: where a ranker training step's time goes, side by side in one run.

    python -m jobs.bench.train                       # CPU: ViT-S/16, batch 32
    python -m jobs.bench.train --batch-size 512      # on a GPU machine (bf16 autocast there)

Prints images/s of: the asymmetric training step (CLS + 19 visible tokens, forward + backward + AdamW),
the same step on all 196 tokens, and loading a view for training (read + decode + replay the view of a
JPEG at ImageNet-like size, one CPU core), so one can see whether the accelerator or the data is the
bottleneck. Random weights and data: speed does not depend on them.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

import ltrp
from jobs.bench.pipeline import write_jpegs
from ltrp.core.losses import listmle
from ltrp.core.optim import param_groups
from ltrp.core.options import RankerGeometry
from ltrp.core.ranker import RANKER_GEOMETRIES, Ranker
from ltrp.data.images import center_crop


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


def load_images_per_second(count: int, size: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(Path(tmp), count)
        start = time.perf_counter()
        for p in paths:
            center_crop(p.read_bytes(), size)
        return count / (time.perf_counter() - start)


@dataclass
class BenchConfig:
    """A ranker training step's time: the asymmetric step, the full step, and loading the views."""

    ranker: RankerGeometry = "ltrp_vit_small_patch16"  # ranker size and patch grid
    batch_size: int = 32  # views per step
    steps: int = 3  # timed steps per figure


def main(argv: list[str] | None = None) -> None:
    cfg = tyro.cli(BenchConfig, args=argv, prog="python -m jobs.bench.train", description=__doc__)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = Ranker(RANKER_GEOMETRIES[cfg.ranker]).to(device).train()
    grid = model.cfg.grid
    visible = ltrp.visible_sets(range(cfg.batch_size), grid=grid).to(device)
    tag = f"train {cfg.ranker} {device.type} batch={cfg.batch_size}"
    print(
        f"{tag}: asymmetric step (CLS + {visible.shape[1]} tokens) "
        f"{step_images_per_second(model, cfg.batch_size, visible, cfg.steps):.1f} img/s",
        flush=True,
    )
    print(
        f"{tag}: full step (all {grid * grid} tokens) "
        f"{step_images_per_second(model, cfg.batch_size, None, cfg.steps):.1f} img/s",
        flush=True,
    )
    print(f"{tag}: view loading, one core {load_images_per_second(64, model.cfg.img_size):.1f} img/s")


if __name__ == "__main__":
    main()
