"""The node-sizing table: the CPU cores one GPU needs to stay busy scoring.

    python -m jobs.bench.sizing     # from docs/figures/feed.json (jobs.bench.feed --views 1 4 8 --images
                                    # 2048 8192 --json ...)

Per MAE, views per image K and GPU:

    GPU views/s     the spec's H100 figure for MAE-B/16 at 19 scores a row (docs/LTRP.md section 6:
                    ~1,400 views/s, bf16, all leave-one-out variants batched), scaled to the other MAE
                    by its FLOPs per view (counted here by torch's FlopCounterMode) and to the L4 by
                    the two chips' dense bf16 peaks (vendor datasheets): estimates until
                    `jobs.bench.scoring` runs on a GPU
    node ms/view    CPU milliseconds a scored view costs the GPU's node, measured by `jobs.bench.feed`
                    on this machine's cores at that K, 19 scores a row, one node, at the margin (its
                    "marginal" row: what a view costs beyond a job's fixed costs, as in a long job):
                    read, decode, the stand-in's Arrow work, commit, Ray's daemons and the rest of
                    the machine's CPU (the object store, moving blocks), from local disk or from S3
                    (moto's own CPU left out)
    cores per GPU   GPU views/s x node ms/view / 1000
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

import torch
import tyro
from torch.utils.flop_counter import FlopCounterMode

import ltrp
from ltrp.core.options import MAEGeometry

FEED_FIGURES = Path(__file__).resolve().parents[2] / "docs" / "figures" / "feed.json"
GPU = Literal["H100", "L4"]
#: Dense bf16 tensor TFLOP/s, from the vendors' datasheets (H100 SXM, L4), for scaling rates only.
DENSE_BF16_TFLOPS: dict[GPU, float] = {"H100": 989.0, "L4": 121.0}
#: docs/LTRP.md section 6: one H100, MAE-B/16, 19 scores a row, bf16, batched (views/s).
H100_MAE_B_VIEWS_PER_S = 1400.0
#: A node's CPU per view: `jobs.bench.feed`'s columns but the driver's and the S3 server's.
NODE_COLUMNS = ("read", "decode", "scorer", "commit", "daemons", "other")


@dataclass(frozen=True)
class Instance:
    """An EC2 instance type, as AWS lists it."""

    vcpus: int
    gib: int
    gpus: int = 0
    gpu: GPU | None = None


#: The instance types the cluster files name.
INSTANCES = {
    "m6i.2xlarge": Instance(8, 32),
    "c6i.4xlarge": Instance(16, 32),
    "g6.4xlarge": Instance(16, 64, 1, "L4"),
}


@cache
def flops_per_view(geometry: MAEGeometry, scores: int) -> float:
    """FLOPs of `ltrp.loo_scores` for one view with `scores` visible patches (decoder mode)."""
    torch.manual_seed(0)
    mae = ltrp.MAE(ltrp.GEOMETRIES[geometry]).eval()
    images = torch.randn(1, 3, mae.cfg.img_size, mae.cfg.img_size)
    visible = torch.arange(scores).unsqueeze(0)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        ltrp.loo_scores(mae, images, visible)
    return float(counter.get_total_flops())


def gpu_views_per_s(gpu: GPU, geometry: MAEGeometry, scores: int = 19) -> float:
    """Estimated views/s of one `gpu` scoring with `geometry`: the spec's H100 MAE-B rate, scaled."""
    by_flops = flops_per_view("mae_vit_base_patch16", 19) / flops_per_view(geometry, scores)
    return H100_MAE_B_VIEWS_PER_S * DENSE_BF16_TFLOPS[gpu] / DENSE_BF16_TFLOPS["H100"] * by_flops


@dataclass(frozen=True)
class FeedFigures:
    """`jobs.bench.feed`'s rows: CPU ms per view by column, per (nodes, actors, storage, K, scores, job)."""

    rows: list[dict]

    @classmethod
    def load(cls, path: Path = FEED_FIGURES) -> FeedFigures:
        return cls(json.loads(path.read_text()))

    def row(self, k: int, storage: str = "local", scores: int = 19, nodes: int = 1, actors: int = 1) -> dict:
        """That configuration's marginal row (`jobs.bench.feed` with two `--images` sizes)."""
        key = {
            "K": k,
            "storage": storage,
            "scores": scores,
            "nodes": nodes,
            "actors": actors,
            "job": "marginal",
        }
        found = [r for r in self.rows if all(r[name] == value for name, value in key.items())]
        if not found:
            raise KeyError(f"no row of jobs.bench.feed for {key}")
        return found[0]

    def node_ms_per_view(self, k: int, storage: str = "local") -> float:
        """CPU ms a view costs its GPU's node at `k` views an image, read from `storage`: a column below 0
        (a difference of two jobs, within their noise) counts as 0."""
        row = self.row(k, storage)
        return sum(max(0.0, row[column]) for column in NODE_COLUMNS)


def cores_per_gpu(
    feed: FeedFigures, gpu: GPU, geometry: MAEGeometry, k: int, storage: str = "local"
) -> float:
    """CPU cores that keep one `gpu` busy scoring `geometry` at `k` views an image."""
    return gpu_views_per_s(gpu, geometry) * feed.node_ms_per_view(k, storage) / 1e3


def table(feed: FeedFigures) -> str:
    """The markdown table: per MAE, K and GPU, its rate and the cores it needs."""
    lines = [
        "| MAE | K | node CPU ms/view (local; S3) | H100 views/s (est.) | cores per H100 (local; S3) "
        "| L4 views/s (est.) | cores per L4 (local; S3) |",
        "|---|---|---|---|---|---|---|",
    ]
    for geometry in ("mae_vit_base_patch16", "mae_vit_large_patch16"):
        for k in (1, 4, 8):
            cells = [f"{feed.node_ms_per_view(k):.2f}; {feed.node_ms_per_view(k, 's3'):.2f}"]
            for gpu in ("H100", "L4"):
                cores = [cores_per_gpu(feed, gpu, geometry, k, s) for s in ("local", "s3")]
                cells += [f"{gpu_views_per_s(gpu, geometry):,.0f}", f"{cores[0]:.1f}; {cores[1]:.1f}"]
            lines.append(f"| {geometry} | {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass
class SizingConfig:
    """The node-sizing table from `jobs.bench.feed`'s rows."""

    feed: Path = FEED_FIGURES  # `python -m jobs.bench.feed --views 1 4 8 --storage local s3 --json ...`


def main(argv: list[str] | None = None) -> None:
    cfg = tyro.cli(SizingConfig, args=argv, prog="python -m jobs.bench.sizing", description=__doc__)
    print(table(FeedFigures.load(cfg.feed)))


if __name__ == "__main__":
    main()
