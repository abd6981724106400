"""Benchmark: the scoring job's own ceiling. A scorer so cheap (the smallest MAE, 64 px, on 28 px
Fashion-MNIST PNGs) that listing, decoding, Ray Data's hand-offs and the commits dominate, on local Ray
clusters of 1, 2 and 3 nodes on this one machine.

    python -m jobs.bench.headroom                              # 1, 2, 3 nodes; 2,048 and 4,096 images
    python -m jobs.bench.headroom --nodes 1 2 --images 1024 --no-mae-b      # a quick check (~3 min)
    python -m jobs.bench.headroom --images 8192 --node-cpus 8 --shard-size 256 --batch-size 256

For each node count: a fresh cluster of `ray start --block` processes (a head and count - 1 workers,
each with --node-cpus logical CPUs and a process group and temp dir of its own, stopped by killing those
groups: `ray stop` would stop every other Ray on the machine too), one scoring actor per node (`scorers`
= nodes, each on --threads torch threads), the library's scoring job (`ScoreJob(cfg).write()`,
without MLflow) called from this process (the driver). Three jobs per cluster, each into a fresh output
folder: a one-shard warm-up (its task workers and the driver's first-job costs then do not fall on the
measured jobs; Ray Data starts the scoring actors anew for every job, so their start-up is in every
figure), then N images, then 2N images (N = --images, the first 2N PNGs of Debian's Fashion-MNIST train
split, repeated if 2N > 60,000). Random MAE weights: speed does not depend on them. The job's own output
(a line per committed shard, Ray's logs) goes to stderr; the figures, one a line, to stdout:

    end to end          rows written / wall seconds of the job (planning, actor start-up, the final
                        commit all included), for the N and the 2N job
    driver CPU          time.process_time() of this process around the job (all its threads:
                        Ray's core worker, Ray Data's executor, the commit bookkeeping), in seconds per
                        10,000 rows written
    marginal            the 2N job minus the N job: (rows_2N - rows_N) / (t_2N - t_N) rows/s, and
                        driver CPU seconds per 10,000 of those rows: the steady-state rate, with the
                        fixed costs of a job (planning, actor start-up, ramp-up and drain) cancelled,
                        but only once N is well past what the job does during those costs: decoding runs
                        while the scoring actors start (10-20 s here, varying from job to job), so at
                        N = 600 the 2N job took 1.4 s longer than the N job, faster than the scorer
                        alone can go; the start-up's variation stays in this figure
    after first commit  the 2N job's rows committed after its first commit / the seconds from its
                        first commit to its last (the files' times): no actor start-up in it, but
                        when decoding finished during the start-up, the scorers and commits alone
    scorer per view     `ltrp.loo_scores` alone on one batch of --batch-size views of the same PNGs
                        (decoded and on the device beforehand), on --threads torch threads,
                        before any cluster starts: seconds per view of the cheap scorer, t_cheap
    MAE-B per view      the same for mae_vit_base_patch16 on 8 random 224 px images, fp32, t_B
                        (--no-mae-b skips it)
    machinery per row   1 / marginal rows/s - t_cheap / scorers: the steady-state wall seconds per
                        row that are not the scorers' own arithmetic (the scorers work in parallel)
    machinery share     machinery per row / t_B: what the machinery costs per row relative to what
                        one MAE-B scorer spends on a view

This machine's cores are shared by every node, the scorers and the driver: more nodes add Ray
processes and scorers but no cores, so the node figures show the machinery's own cost growing or not,
not how a cluster of real machines would scale.
"""

from __future__ import annotations

import contextlib
import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray
import torch
import tyro

import ltrp
from jobs.bench.local_ray import LocalCluster, check_same_code
from ltrp.core.options import MAEGeometry
from ltrp.data.datasets import read_fashion_mnist
from ltrp.data.images import center_crop, png_bytes, to_model_input
from ltrp.pipeline.configs import ScoreConfig
from ltrp.pipeline.score_job import ScoreJob


@dataclass
class HeadroomConfig:
    """The scoring job's own ceiling: a cheap scorer on 1, 2 and 3 local Ray nodes."""

    nodes: tuple[int, ...] = (1, 2, 3)  # cluster sizes to measure, each a fresh cluster
    images: int = 2048  # N: the small job scores N images, the large one 2N
    geometry: MAEGeometry = "mae_vit_tiny_patch8"  # the cheap scorer's MAE (random weights)
    views: int = 1  # views per image (rows = images x views)
    shard_size: int = 64  # images per shard (the unit of decode and commit)
    batch_size: int = 64  # views per scoring call
    node_cpus: int = 2  # logical CPUs of each node, the head's included
    worker_cpus: float = 1.0  # CPUs each scoring actor reserves (one actor per node)
    threads: int = 1  # torch threads of each scoring actor, and of the per-view timings
    kernel_repeats: int = 20  # timed batches of the cheap scorer alone
    mae_b: bool = True  # time MAE-B per view too (--no-mae-b skips it: ~40 s at 1 thread on this CPU)
    mae_b_repeats: int = 1  # timed batches of 8 MAE-B views
    seed: int = 0  # MAE weights and the random MAE-B images


@dataclass(frozen=True)
class JobFigures:
    rows: int
    wall: float  # seconds
    cpu: float  # driver CPU seconds


def write_pngs(folder: Path, images: np.ndarray, count: int) -> Path:
    """The first `count` images as PNGs, repeating the split past its end (distinct file names, so
    distinct image ids)."""
    folder.mkdir(parents=True)
    for i in range(count):
        (folder / f"{i:06d}.png").write_bytes(png_bytes(images[i % len(images)]))
    return folder


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def seconds_per_view(
    fn: Callable[[], torch.Tensor], views: int, repeats: int, warm_up: Callable[[], torch.Tensor]
) -> float:
    warm_up()  # allocator, kernel selection
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / (views * repeats)


def cheap_seconds_per_view(mae: ltrp.MAE, folder: Path, cfg: HeadroomConfig) -> float:
    """The cheap scorer alone on the job's first batch of views, decoded as the job decodes them."""
    paths = sorted(folder.iterdir())[: cfg.batch_size]
    pixels = np.stack([center_crop(p.read_bytes(), mae.cfg.img_size) for p in paths])
    images = to_model_input(torch.from_numpy(pixels))
    visible = ltrp.visible_sets([p.stem for p in paths], grid=mae.cfg.grid)
    with torch.no_grad(), torch_threads(cfg.threads):
        batch = partial(ltrp.loo_scores, mae, images, visible)
        return seconds_per_view(batch, len(paths), cfg.kernel_repeats, warm_up=batch)


def mae_b_seconds_per_view(cfg: HeadroomConfig) -> float:
    torch.manual_seed(cfg.seed)
    mae = ltrp.MAE(ltrp.GEOMETRIES["mae_vit_base_patch16"]).eval()
    size, grid = mae.cfg.img_size, mae.cfg.grid
    images = torch.randn(8, 3, size, size)
    visible = ltrp.visible_sets(range(8), grid=grid)
    with torch.no_grad(), torch_threads(cfg.threads):
        # Warmed up on one view: a whole batch would add ~30 s at 1 thread here for no better figure.
        one = partial(ltrp.loo_scores, mae, images[:1], visible[:1])
        return seconds_per_view(
            partial(ltrp.loo_scores, mae, images, visible), 8, cfg.mae_b_repeats, warm_up=one
        )


def after_first_commit(output: Path) -> JobFigures:
    """Rows a job committed after its first commit, and the seconds from that commit to its last."""
    parts = sorted((output / "scores").glob("part-*.parquet"), key=lambda p: p.stat().st_mtime)
    rows = sum(pq.read_metadata(p).num_rows for p in parts[1:])
    return JobFigures(rows, parts[-1].stat().st_mtime - parts[0].stat().st_mtime, math.nan)


def run_job(source: Path, output: Path, mae: Path, scorers: int, cfg: HeadroomConfig) -> JobFigures:
    job = ScoreConfig(
        source=str(source),
        mae=str(mae),
        output=str(output),
        views=cfg.views,
        shard_size=cfg.shard_size,
        file_shards=1,  # a file per shard: its time is the shard's commit, which is what is measured
        batch_size=cfg.batch_size,
        workers=scorers,
        worker_cpus=cfg.worker_cpus,
        threads=cfg.threads,
        device="cpu",
    )
    # The job's progress lines to stderr, so that stdout holds the figures only.
    with contextlib.redirect_stdout(sys.stderr):
        cpu, wall = time.process_time(), time.perf_counter()
        summary = ScoreJob(job).write()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return JobFigures(summary.rows_written, wall, cpu)


def per_10k(cpu: float, rows: int) -> float:
    return cpu / rows * 10_000 if rows else math.nan


def report(tag: str, label: str, job: JobFigures) -> None:
    rate = job.rows / job.wall
    print(f"{tag}: end to end {label} {job.rows} rows in {job.wall:.2f} s, {rate:.1f} rows/s", flush=True)
    print(
        f"{tag}: driver CPU {label} {job.cpu:.2f} s, {per_10k(job.cpu, job.rows):.2f} s per 10k rows",
        flush=True,
    )


def bench_nodes(
    nodes: int, root: Path, corpora: dict[str, Path], mae: Path, cfg: HeadroomConfig
) -> JobFigures | None:
    """One cluster's figures, printed as they come; returns the marginal (2N minus N) figures, None
    when the 2N job took no longer than the N job (noise: no steady rate can be told)."""
    tag = (
        f"headroom {cfg.geometry} nodes={nodes} scorers={nodes} node_cpus={cfg.node_cpus} "
        f"threads={cfg.threads} views={cfg.views} shard={cfg.shard_size} batch={cfg.batch_size}"
    )
    cluster = LocalCluster(nodes, cfg.node_cpus)
    try:
        ray.init(address=cluster.address, _node_ip_address="127.0.0.1")
        cluster.wait_for_nodes(nodes, cfg.node_cpus)
        check_same_code()
        out = root / f"out-{nodes}"
        warm_up = run_job(corpora["warm-up"], out / "warm-up", mae, nodes, cfg)
        print(
            f"{tag}: warm-up job {warm_up.rows} rows in {warm_up.wall:.2f} s (not in the figures)", flush=True
        )
        small = run_job(corpora["N"], out / "N", mae, nodes, cfg)
        report(tag, "N", small)
        large = run_job(corpora["2N"], out / "2N", mae, nodes, cfg)
        report(tag, "2N", large)
        steady = after_first_commit(out / "2N")
        if steady.wall > 0:
            print(
                f"{tag}: 2N after its first commit {steady.rows} rows in {steady.wall:.2f} s, "
                f"{steady.rows / steady.wall:.1f} rows/s",
                flush=True,
            )
    finally:
        ray.shutdown()
        cluster.stop()
    marginal = JobFigures(large.rows - small.rows, large.wall - small.wall, large.cpu - small.cpu)
    if marginal.wall <= 0 or marginal.rows <= 0:
        print(f"{tag}: marginal n/a (the 2N job took {marginal.wall:+.2f} s against the N job)", flush=True)
        return None
    print(
        f"{tag}: marginal {marginal.rows / marginal.wall:.1f} rows/s "
        f"({marginal.rows} rows in {marginal.wall:.2f} s)",
        flush=True,
    )
    print(f"{tag}: marginal driver CPU {per_10k(marginal.cpu, marginal.rows):.2f} s per 10k rows", flush=True)
    return marginal


def main() -> None:
    cfg = tyro.cli(HeadroomConfig, prog="python -m jobs.bench.headroom", description=__doc__)
    print(f"headroom: ltrp from {Path(ltrp.__file__).parent}", flush=True)
    torch.manual_seed(cfg.seed)
    mae = ltrp.MAE(ltrp.GEOMETRIES[cfg.geometry]).eval()
    images, _ = read_fashion_mnist("train")
    with tempfile.TemporaryDirectory(prefix="ltrp-headroom-") as tmp:
        root = Path(tmp)
        ltrp.save_mae(mae, str(root / "mae.pth"))
        corpora = {
            "warm-up": write_pngs(root / "warm-up", images, cfg.shard_size),
            "N": write_pngs(root / "N", images, cfg.images),
            "2N": write_pngs(root / "2N", images, 2 * cfg.images),
        }
        # Before any cluster starts: the machine to the kernels alone.
        cheap = cheap_seconds_per_view(mae, corpora["N"], cfg)
        print(
            f"headroom {cfg.geometry} scorer alone threads={cfg.threads} batch={cfg.batch_size}: "
            f"{cheap * 1e3:.3f} ms per view",
            flush=True,
        )
        mae_b = mae_b_seconds_per_view(cfg) if cfg.mae_b else None
        if mae_b is not None:
            print(
                f"headroom mae_vit_base_patch16 scorer alone threads={cfg.threads} batch=8 fp32: "
                f"{mae_b:.3f} s per view",
                flush=True,
            )
        for nodes in cfg.nodes:
            marginal = bench_nodes(nodes, root, corpora, root / "mae.pth", cfg)
            if marginal is None:
                continue
            machinery = marginal.wall / marginal.rows - cheap / nodes
            # Below zero: the N job's extra rows were hidden behind its fixed costs (noise): raise --images.
            noise = " (below zero: within noise, raise --images)" if machinery <= 0 else ""
            print(f"headroom nodes={nodes}: machinery {machinery * 1e3:.3f} ms per row{noise}", flush=True)
            if mae_b is not None:
                print(
                    f"headroom nodes={nodes}: machinery share at MAE-B cost {machinery / mae_b:.4f} "
                    f"(machinery per row / MAE-B seconds per view)",
                    flush=True,
                )


if __name__ == "__main__":
    main()
