"""Benchmark: leave-one-out scoring, the authors' reference loop against the batched path, side by side.

    python -m jobs.bench.scoring                       # CPU, MAE-B, batch 8, fp32
    python -m jobs.bench.scoring --device cuda --geometries mae_vit_base_patch16 mae_vit_large_patch16 \
        --batch-size 128 --compile

Random weights and random images (speed does not depend on them). Prints one line per figure. On a GPU
it also prints the Kendall tau of reduced-precision scores against fp32 scores with TF32 off.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import tyro

import ltrp
from ltrp.core.options import MAEGeometry
from ltrp.core.ranking_metrics import kendall_tau
from ltrp.core.reference_loop import reference_loo_scores


@dataclass
class BenchConfig:
    """Leave-one-out scoring: the authors' loop against the batched path, side by side."""

    geometries: tuple[MAEGeometry, ...] = ("mae_vit_base_patch16",)  # MAEs to time
    batch_size: int = 8  # images per batch
    device: Literal["cpu", "cuda"] = "cpu"  # where to time
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


def bench_geometry(name: str, cfg: BenchConfig) -> None:
    geometry = ltrp.GEOMETRIES[name]
    torch.manual_seed(0)
    mae = ltrp.MAE(geometry).eval().to(cfg.device)
    images = torch.randn(cfg.batch_size, 3, geometry.img_size, geometry.img_size, device=cfg.device)
    visible = ltrp.visible_sets(range(cfg.batch_size), grid=geometry.grid).to(cfg.device)
    n = visible.shape[1]
    # Reduced precision only on the GPU: on this project's CPUs it is slower and less faithful.
    low = torch.bfloat16 if cfg.device == "cuda" else None
    tag = f"scoring {name} {cfg.device} {'bf16' if low else 'fp32'} batch={cfg.batch_size} n={n}"

    def reference() -> torch.Tensor:
        with torch.autocast(cfg.device, dtype=low, enabled=low is not None):
            return reference_loo_scores(mae, images, visible)

    def batched() -> torch.Tensor:
        return ltrp.loo_scores(mae, images, visible, max_tokens=cfg.max_tokens, autocast_dtype=low)

    ref = _images_per_second(reference, cfg.batch_size, cfg.repeats, cfg.device)
    print(f"{tag}: reference loop {ref:.2f} img/s", flush=True)
    fast = _images_per_second(batched, cfg.batch_size, cfg.repeats, cfg.device)
    print(f"{tag}: batched {fast:.2f} img/s ({fast / ref:.2f}x reference)", flush=True)
    if cfg.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        exact = ltrp.loo_scores(mae, images, visible, max_tokens=cfg.max_tokens)
        for label, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            approx = ltrp.loo_scores(mae, images, visible, max_tokens=cfg.max_tokens, autocast_dtype=dtype)
            tau = kendall_tau(approx, exact).mean().item()
            print(f"{tag}: kendall tau {label} autocast vs fp32 (TF32 off) {tau:.4f}", flush=True)
    if cfg.compile:
        mae.compile_blocks()
        compiled = _images_per_second(batched, cfg.batch_size, cfg.repeats, cfg.device)
        print(f"{tag}: batched + torch.compile {compiled:.2f} img/s ({compiled / ref:.2f}x reference)")


def main() -> None:
    cfg = tyro.cli(BenchConfig, prog="python -m jobs.bench.scoring", description=__doc__)
    for name in cfg.geometries:
        bench_geometry(name, cfg)


if __name__ == "__main__":
    main()
