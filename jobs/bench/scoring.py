"""Benchmark: leave-one-out scoring, the authors' reference loop against the batched path, side by side.

    python -m jobs.bench.scoring                       # CPU, MAE-B, batch 8, fp32
    python -m jobs.bench.scoring --device cuda --geometries mae_vit_base_patch16 mae_vit_large_patch16 \
        --batch-size 128 --precisions fp32 bf16 fp16 --compile
    python -m jobs.bench.scoring --device cuda --mae ltrp/data/weights/mae_vit_scenes_v2_patch4.pth \
        --batch-size 512 --precisions fp32 bf16 fp16 --compile   # tau on an MAE whose decoder is trained

Random images; random weights unless --mae gives a checkpoint (speed does not depend on them; the Kendall
tau does: reduced precision reorders near-ties, which random decoders are full of). Prints one line per
figure: the reference loop at fp32, then the batched path at each precision (and under torch.compile
with --compile), with its Kendall tau against fp32 scores computed with TF32 off.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import tyro

import ltrp
from ltrp.core.leave_one_out import AUTOCAST_DTYPES
from ltrp.core.options import MAEGeometry, Precision
from ltrp.core.ranking_metrics import kendall_tau
from ltrp.core.reference_loop import reference_loo_scores


@dataclass
class BenchConfig:
    """Leave-one-out scoring: the authors' loop against the batched path, side by side."""

    geometries: tuple[MAEGeometry, ...] = ("mae_vit_base_patch16",)  # MAEs to time (random weights)
    mae: str | None = None  # a checkpoint to time instead of --geometries (a trained decoder: a real tau)
    batch_size: int = 8  # images per batch
    device: Literal["cpu", "cuda"] = "cpu"  # where to time
    precisions: tuple[Precision, ...] = ("fp32",)  # autocast of the batched path (fp16/bf16 on a GPU)
    repeats: int = 2  # timed batches per figure
    compile: bool = False  # also time the batched path under torch.compile
    max_tokens: int | None = None  # decoder tokens per chunk; None: the library's per-device default


def _images_per_second(fn: Callable[[], torch.Tensor], images: int, repeats: int, device: str) -> float:
    fn()  # warm-up: allocator, kernel selection, compilation
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return images * repeats / (time.perf_counter() - start)


def bench(mae: ltrp.MAE, name: str, cfg: BenchConfig) -> None:
    geometry = mae.cfg
    torch.manual_seed(0)
    mae = mae.eval().to(cfg.device)
    images = torch.randn(cfg.batch_size, 3, geometry.img_size, geometry.img_size, device=cfg.device)
    visible = ltrp.visible_sets(range(cfg.batch_size), grid=geometry.grid).to(cfg.device)
    tag = f"scoring {name} {cfg.device} batch={cfg.batch_size} n={visible.shape[1]}"

    def reference() -> torch.Tensor:
        return reference_loo_scores(mae, images, visible)

    def batched(precision: Precision) -> Callable[[], torch.Tensor]:
        dtype = AUTOCAST_DTYPES[precision]
        return lambda: ltrp.loo_scores(mae, images, visible, max_tokens=cfg.max_tokens, autocast_dtype=dtype)

    ref = _images_per_second(reference, cfg.batch_size, cfg.repeats, cfg.device)
    print(f"{tag}: reference loop fp32 {ref:.2f} img/s", flush=True)
    exact = _fp32_without_tf32(batched("fp32")) if cfg.device == "cuda" else None
    for compiled in (False, True) if cfg.compile else (False,):
        if compiled:
            mae.compile_blocks()
        for precision in cfg.precisions:
            fast = _images_per_second(batched(precision), cfg.batch_size, cfg.repeats, cfg.device)
            line = f"{tag}: batched {precision}{' + torch.compile' if compiled else ''} {fast:.2f} img/s "
            line += f"({fast / ref:.2f}x reference)"
            if exact is not None:
                tau = kendall_tau(batched(precision)(), exact).mean().item()
                line += f", kendall tau vs fp32 (TF32 off) {tau:.4f}"
            print(line, flush=True)


def _fp32_without_tf32(score: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The reference scores for the taus: fp32 with TF32 off (TF32 itself rounds to 10 mantissa bits)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        return score()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def main() -> None:
    cfg = tyro.cli(BenchConfig, prog="python -m jobs.bench.scoring", description=__doc__)
    if cfg.mae:
        bench(ltrp.load_mae(cfg.mae), cfg.mae, cfg)
        return
    for name in cfg.geometries:
        torch.manual_seed(0)
        bench(ltrp.MAE(ltrp.GEOMETRIES[name]), name, cfg)


if __name__ == "__main__":
    main()
