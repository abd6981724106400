"""Benchmark: can the CPUs feed a GPU? The scoring job at GPU demand, its CPU cost per scored view by stage.

    python -m jobs.bench.feed                          # K = 1, 4, 8; 512 JPEGs; a stand-in at 1,500 views/s
    python -m jobs.bench.feed --views 8 --images 256 --rate 400      # a quick look (~1 min)

The library's scoring job (`ScoreJob`, MAE-B/16 geometry at 224 px, random fp16 weights: only its shape
is used) runs on a local Ray started here, over ImageNet-sized JPEGs of scikit-image's photos
(`jobs.bench.jpegs`) on local disk, in shards of --shard-size images, with its MAE stage replaced by
the stand-in of `jobs.bench.standin`: one actor that holds each batch as long as a GPU at --rate views/s
would, computing nothing. What limits the job is then the CPU side only. Per K (views per image):

    views/s             views written / the job's wall seconds (planning, actor start-up and the last
                        commit included), against the stand-in's rate: their ratio is the headroom
    decode, scorer,     each Ray Data operator's remote CPU time (Ray Data's own per-task accounting,
    commit ms/view      `Dataset.stats()`), per view written
    driver ms/view      time.process_time() of this process around the job (Ray Data's executor,
                        Ray's core worker threads, the shard bookkeeping), per view written

Then the same K on twice the images (the first N are the same JPEGs), and the steady state as the
difference of the two jobs, which cancels their fixed costs (planning, actor start-up, ramp-up, drain):

    marginal views/s    (views_2N - views_N) / (seconds_2N - seconds_N)
    driver CPU-s / 10k  (driver CPU_2N - driver CPU_N) per 10,000 of those views

A first job of one shard warms the cluster up (worker processes, imports) and is not reported. Ray's
own daemons (raylet, GCS, object store) are not counted here. The numbers are per view, so a GPU at
R views/s needs about R x (decode + scorer + commit + driver) ms of CPU each second.
"""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import ray
import torch
import tyro

import ltrp
from jobs.bench.jpegs import imagenet_sized_jpegs
from jobs.bench.standin import StandInScoreJob
from ltrp.pipeline.configs import ScoreConfig
from ltrp.pipeline.stages import Stage, dataset

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "hubble_deep_field")
#: Ray Data's per-operator line of remote CPU time, e.g. "* Remote cpu time: 1ms min, ... 689.61ms total".
CPU_TOTAL = re.compile(r"Remote cpu time:.*?([\d.]+)(us|ms|s) total")
UNIT = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
STAGES = ("decode", "scorer", "commit", "driver")


@dataclass
class FeedConfig:
    """The scoring job's CPU cost per view, at a stand-in GPU's demand."""

    views: tuple[int, ...] = (1, 4, 8)  # K, views per image
    images: int = 512
    rate: float = 1500.0  # the stand-in's views/s (an H100 scoring MAE-B/16 in bf16: ~1,400-1,600)
    shard_size: int = 256
    batch_size: int = 64
    mask_ratio: float = 0.9  # 19 of 196 patches visible: 19 scores a row
    cpus: int = 4  # logical CPUs of the local Ray (more than the cores: decode tasks beside the actor)


@dataclass(frozen=True)
class Figures:
    views: int
    seconds: float
    driver_cpu: float
    operator_cpu: dict[str, float]  # operator name -> CPU seconds


def write_corpus(folder: Path, count: int) -> Path:
    (folder / "photos").mkdir(parents=True)
    for i, data in enumerate(imagenet_sized_jpegs(count, PHOTOS)):
        (folder / "photos" / f"{i:06d}.jpg").write_bytes(data)
    return folder


def first_of(corpus: Path, folder: Path, count: int) -> Path:
    """A corpus of `corpus`'s first `count` JPEGs, linked, not encoded again."""
    (folder / "photos").mkdir(parents=True)
    for path in sorted((corpus / "photos").iterdir())[:count]:
        (folder / "photos" / path.name).symlink_to(path)
    return folder


def operator_cpu(stats: str) -> dict[str, float]:
    """Operator name -> its remote CPU seconds, from `Dataset.stats()` text."""
    found = {}
    for block in re.split(r"^Operator \d+ ", stats, flags=re.M)[1:]:
        name = block.split(":", 1)[0]
        match = CPU_TOTAL.search(block)
        if match:
            found[name] = float(match[1]) * UNIT[match[2]]
    return found


def _stage(operator: str) -> str:
    """The table's name of a Ray Data operator, e.g. "MapBatches(decode_shards)" -> "decode"."""
    for stage, fn in (("decode", "decode_shards"), ("scorer", "StandInScorer"), ("commit", "commit_shards")):
        if fn in operator:
            return stage
    return operator


def run_job(cfg: ScoreConfig, rate: float) -> Figures:
    stats: list[str] = []

    def runner(stages: list[Stage], items: list[dict]) -> Iterator[dict]:
        ds = dataset(stages, items)
        yield from ds.iter_rows()
        stats.append(ds.stats())

    cpu, wall = time.process_time(), time.perf_counter()
    summary = StandInScoreJob(cfg, views_per_second=rate).write(runner, progress=lambda _: None)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return Figures(summary.rows_written, wall, cpu, operator_cpu(stats[0]))


def main(argv: list[str] | None = None) -> list[dict]:
    cfg = tyro.cli(FeedConfig, args=argv, prog="python -m jobs.bench.feed", description=__doc__)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        double = write_corpus(root / "double", 2 * cfg.images)
        corpus = first_of(double, root / "corpus", cfg.images)
        mae = root / "mae_b.pth"
        ltrp.save_mae(ltrp.MAE(ltrp.GEOMETRIES["mae_vit_base_patch16"]), str(mae), dtype=torch.float16)
        ray.init(num_cpus=cfg.cpus)
        job = ScoreConfig(
            source=str(corpus), mae=str(mae), output="", shard_size=cfg.shard_size, batch_size=cfg.batch_size,
            mask_ratio=cfg.mask_ratio, workers=1, worker_cpus=0.5, device="cpu",
        )  # fmt: skip
        warm = first_of(double, root / "warm", 8)
        run_job(replace(job, source=str(warm), output=str(root / "out-warm")), cfg.rate)
        print(
            "| K | views | views/s (stand-in's rate) | decode | scorer | commit | driver (CPU ms/view) "
            "| marginal views/s | driver CPU-s per 10k views, marginal |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for k in cfg.views:
            f = run_job(replace(job, views=k, output=str(root / f"out-{k}")), cfg.rate)
            f2 = run_job(replace(job, source=str(double), views=k, output=str(root / f"out2-{k}")), cfg.rate)
            row = {"K": k, "views": f.views, "views_per_s": f.views / f.seconds, "rate": cfg.rate}
            row |= {_stage(name): 1e3 * s / f.views for name, s in f.operator_cpu.items()}
            row["driver"] = 1e3 * f.driver_cpu / f.views
            row["marginal_views_per_s"] = (f2.views - f.views) / (f2.seconds - f.seconds)
            row["marginal_driver_per_10k"] = 1e4 * (f2.driver_cpu - f.driver_cpu) / (f2.views - f.views)
            rows.append(row)
            cells = " | ".join(f"{row.get(stage, float('nan')):.3f}" for stage in STAGES)
            print(
                f"| {k} | {f.views} | {row['views_per_s']:.0f} ({cfg.rate:g}) | {cells} "
                f"| {row['marginal_views_per_s']:.0f} | {row['marginal_driver_per_10k']:.2f} |",
                flush=True,
            )
        ray.shutdown()
    return rows


if __name__ == "__main__":
    main()
