"""Benchmark: can the CPUs feed a GPU? The scoring job at GPU demand, its CPU cost per scored view by stage.

    python -m jobs.bench.feed           # K = 8, 195 scores a row, local disk and S3, 1 and 2 nodes (~10 min)
    python -m jobs.bench.feed --images 2048 8192    # ... and what a view costs beyond each job's fixed costs
    python -m jobs.bench.feed --views 1 4 8 --scores 19 --storage local --nodes 1       # the K table
    python -m jobs.bench.feed --photo-side 96 --actors 1 2 4 --storage local --nodes 1  # the driver at
                                                                   # 1-4 GPUs' demand (cheap JPEGs)

The library's scoring job (`ScoreJob`, MAE-B/16's geometry at 224 px; random fp16 weights, of which only
the shape is used), its MAE stage replaced by `jobs.bench.standin`: actors that hold each batch as long as
a GPU at --rate views/s would, computing nothing, so that what limits the job is the CPU side only. It
runs on a local cluster of `ray start` nodes (--node-cpus logical CPUs each, all on this machine's cores),
--actors stand-in actors a node, over --images JPEGs of scikit-image's photos (`jobs.bench.jpegs`,
longer side --photo-side: 500 is ImageNet's) in shards of --shard-size, on local disk or in a bucket of
a moto S3 server on 127.0.0.1 (source and output both). A job of one image a shard warms each cluster
up first, starting a decode worker on every logical CPU.
For each job, CPU milliseconds per view written:

    read        the job's shards read into memory (`read_shard`) in this process, once per storage: the
                part of the decode operator's CPU that fetching the bytes takes
    decode      the decode operator's remote CPU time (`Dataset.stats()`), minus read
    scorer      the stand-in operator's (Arrow only: its sleeping is not CPU)
    commit      the commit operator's (staging, committing and combining the shards' files)
    driver      `time.process_time()` of this process around the job: planning, Ray Data's executor,
                Ray's core worker threads, the lease, the commit bookkeeping
    daemons     the Ray nodes' own processes (raylet, GCS, dashboard, agents, log monitors; `psutil`),
                not their task and actor workers
    other       this machine's busy CPU time (`psutil.cpu_times`) minus all the other columns: the
                workers outside the operators' tasks (an actor's start-up and imports, serialising
                blocks into the object store, moving them between nodes, Ray Data's own actors), the
                kernel's work for them, anything else running (nothing else ran here)
    S3 server   moto's process, which a cluster on real S3 does not run (not in the other columns)

With two --images sizes, a "marginal" row follows each pair: the larger job's CPU less the smaller's,
per extra view, column by column, and the extra views over the extra seconds. What a job pays once
(its planning, the MAE's check, the scoring actors' start-up and imports, the last commit) cancels:
it is what each view costs a job of millions of images. Then the machinery a view (MACHINERY: outside
reading, decoding and the model), and what it comes to at the stand-ins' demand if the cores of the
columns paid by the second (PER_SECOND: the driver's loop, the daemons, the idle workers) stay as they
are; then the fixed CPU seconds a job, by column.

And the rates: views/s end to end (planning, actor start-up and the last commit included) against
the stand-ins' demand (their rate times their number). The driver: its cores from the job's first
commit to its last (its CPU seconds a second, fixed costs left out), and what that comes to per
10,000 views at the demand. Its cost is mostly Ray Data's scheduling loop, paid per second a job
runs, not per view: that last figure holds if its cores stay the same at a GPU's rate, which
`--photo-side 96 --actors 1 2 4` (JPEGs cheap enough that these cores reach that rate) tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from itertools import product
from pathlib import Path
from typing import Literal
from unittest import mock

import fsspec
import psutil
import ray
import torch
import tyro

import ltrp
from jobs.bench.jpegs import imagenet_sized_jpegs
from jobs.bench.local_ray import LocalCluster, check_same_code
from jobs.bench.standin import StandInScoreJob
from ltrp import local
from ltrp.data.sources import plan_corpus, read_shard
from ltrp.pipeline.configs import ScoreConfig
from ltrp.pipeline.stages import Stage, dataset

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "hubble_deep_field")
#: Ray Data's per-operator line of remote CPU time, e.g. "* Remote cpu time: 1ms min, ... 689.61ms total".
CPU_TOTAL = re.compile(r"Remote cpu time:.*?([\d.]+)(us|ms|s) total")
UNIT = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
#: Scores a row -> the mask ratio that gives them: 19 of 196 patches visible (MAE's 0.9), or 195, the most
#: leave-one-out scores (with all 196 visible, no patch is left to measure a reconstruction on).
MASK_RATIOS = {19: 0.9, 195: 0.005}
COLUMNS = ("read", "decode", "scorer", "commit", "driver", "daemons", "other", "s3_server")
#: The machinery: the columns outside reading, decoding and the model (the stand-in's Arrow work is ours).
MACHINERY = ("scorer", "commit", "driver", "daemons", "other")
#: Of those, the ones paid by the second (the same cores at any rate), not by the view.
PER_SECOND = ("driver", "daemons", "other")
BUCKET = "s3://ltrp-feed"


@dataclass
class FeedConfig:
    """The scoring job's CPU cost per view, at stand-in GPUs' demand: a job per combination of the
    tuples' values."""

    views: tuple[int, ...] = (8,)  # K, views per image
    scores: tuple[Literal[19, 195], ...] = (195,)  # scores a row (visible patches)
    storage: tuple[Literal["local", "s3"], ...] = ("local", "s3")
    nodes: tuple[int, ...] = (1, 2)  # local Ray nodes
    actors: tuple[int, ...] = (1,)  # stand-in actors (GPUs) a node
    images: tuple[int, ...] = (2048,)  # images a job; two sizes add the marginal row
    photo_side: int = 500  # longer side of the JPEGs (ImageNet's typical 500 x 375)
    rate: float = 1500.0  # each stand-in's views/s (an H100 scoring MAE-B/16 in bf16: ~1,400-1,600)
    shard_size: int = 256
    batch_size: int = 64
    node_cpus: int = 4  # logical CPUs a node (more than the cores: decode tasks beside the actors)
    actor_cpus: float = 0.25
    json: Path | None = None  # also write the rows here (`jobs.bench.sizing` reads them)
    object_store_gb: float = 4.0  # a node's (a shard's views at K = 8 are 300 MB: less spills to disk)


@dataclass
class Figures:
    """One job's CPU seconds by column, its views and seconds, and its driver's steady state."""

    views: int
    seconds: float
    cpu: dict[str, float]  # column -> CPU seconds
    steady_seconds: float  # from the first commit to the last
    steady_driver: float  # the driver's CPU seconds meanwhile
    workers: dict[str, float] = field(default_factory=dict)  # the workers' CPU seconds by title


def write_corpus(folder: Path, count: int, side: int) -> Path:
    (folder / "photos").mkdir(parents=True)
    for i, data in enumerate(imagenet_sized_jpegs(count, PHOTOS, side=side)):
        (folder / "photos" / f"{i:06d}.jpg").write_bytes(data)
    return folder


def upload(corpus: Path, uri: str) -> str:
    fs, root = fsspec.core.url_to_fs(uri)
    fs.put(str(corpus / "photos"), f"{root}/photos", recursive=True)
    return uri


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


def read_seconds(source: str, shard_size: int) -> float:
    """CPU seconds this process takes to read every image of `source` into memory, shard by shard."""
    start = time.process_time()
    for shard in plan_corpus(source, shard_size).shards:
        for _ in read_shard(shard):
            pass
    return time.process_time() - start


class MachineCPU:
    """CPU seconds used so far: by this machine in all, by a local Ray cluster's daemons (the processes
    of its nodes that are not task or actor workers, which live through a job) and by the S3 server."""

    def __init__(self, cluster: LocalCluster, s3_server: local.Server | None) -> None:
        self.daemons = [p for p in _node_processes(cluster) if not _is_worker(p)]
        self.s3_server = [psutil.Process(s3_server.proc.pid)] if s3_server else []

    def read(self) -> dict[str, float]:
        busy = psutil.cpu_times()
        return {
            "machine": sum(busy) - busy.idle - busy.iowait,
            "daemons": _seconds(self.daemons),
            "s3_server": _seconds(self.s3_server),
        }


def _node_processes(cluster: LocalCluster) -> list[psutil.Process]:
    """Every process of the cluster's nodes: each `ray start` process and its descendants (a worker has
    a process group of its own, but the raylet is its parent)."""
    nodes = [psutil.Process(node.proc.pid) for node in [cluster.head, *cluster.workers]]
    return [p for node in nodes for p in [node, *node.children(recursive=True)]]


def _title(p: psutil.Process) -> str:
    return " ".join(p.cmdline()).strip()


def _is_worker(p: psutil.Process) -> bool:
    """Ray titles a worker "ray::IDLE", "ray::MapBatches(...)", ...; an agent "ray::...Agent"."""
    title = _title(p)
    return title.startswith("ray::") and not title.endswith("Agent")


def _seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for p in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = p.cpu_times()
            total += times.user + times.system
    return total


class WorkerSampler:
    """The CPU seconds of a cluster's task and actor workers during a block, by title ("ray::IDLE",
    "ray::MapWorker(...)"): every worker is read twice a second, so one that exits loses at most its last
    half second. The sampling thread's own CPU is counted (`thread_seconds`), to be taken off the
    driver's."""

    def __init__(self, cluster: LocalCluster, interval: float = 0.5) -> None:
        self.cluster = cluster
        self.interval = interval
        self.seen: dict[int, tuple[str, float, float]] = {}  # pid -> (title, first, last CPU seconds)
        self.thread_seconds = 0.0

    def _sample(self) -> None:
        for p in _node_processes(self.cluster):
            with contextlib.suppress(psutil.NoSuchProcess):
                if _is_worker(p):
                    title, first, _ = self.seen.get(p.pid, ("ray::IDLE", None, 0.0))
                    times, now_title = p.cpu_times(), _title(p)
                    now = times.user + times.system
                    title = title if now_title == "ray::IDLE" else now_title  # what it last worked on
                    self.seen[p.pid] = (title, now if first is None else first, now)

    def _run(self) -> None:
        start = time.thread_time()
        while not self.stop.wait(self.interval):
            self._sample()
        self.thread_seconds = time.thread_time() - start

    def __enter__(self) -> WorkerSampler:
        self._sample()  # workers alive now count from now; later ones from their start
        self.seen = {pid: (title, last, last) for pid, (title, _, last) in self.seen.items()}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def by_title(self) -> dict[str, float]:
        """CPU seconds by title, "TITLE xN" for N processes."""
        totals: dict[str, list] = {}
        for title, first, last in self.seen.values():
            entry = totals.setdefault(title, [0.0, 0])
            entry[0] += last - first
            entry[1] += last > first
        named = {f"{title} x{count}": seconds for title, (seconds, count) in totals.items()}
        return dict(sorted(named.items(), key=lambda item: -item[1]))


def run_job(cfg: ScoreConfig, rate: float, meter: MachineCPU, sampler: WorkerSampler) -> Figures:
    stats: list[str] = []
    commits: list[tuple[float, float]] = []  # (wall, driver CPU) at each commit

    def runner(stages: list[Stage], items: list[dict]) -> Iterator[dict]:
        ds = dataset(stages, items)
        for manifest in ds.iter_rows():
            commits.append((time.perf_counter(), time.process_time()))
            yield manifest
        stats.append(ds.stats())

    before, cpu, wall = meter.read(), time.process_time(), time.perf_counter()
    with sampler:
        summary = StandInScoreJob(cfg, views_per_second=rate).write(runner, progress=lambda _: None)
    wall, cpu, after = time.perf_counter() - wall, time.process_time() - cpu, meter.read()
    cpu -= sampler.thread_seconds
    used = {name: after[name] - before[name] for name in after}
    columns = {_stage(name): s for name, s in operator_cpu(stats[0]).items()}
    columns |= {"driver": cpu, "daemons": used["daemons"], "s3_server": used["s3_server"]}
    columns["other"] = used["machine"] - sum(columns.values()) - sampler.thread_seconds
    (t0, c0), (t1, c1) = commits[0], commits[-1]
    return Figures(summary.rows_written, wall, columns, t1 - t0, c1 - c0, sampler.by_title())


def row_of(f: Figures, read: float, key: dict, demand: float) -> dict:
    """The table's row: CPU ms per view by column (`read`: the job's CPU seconds reading), and the rates."""
    cpu = f.cpu | {"read": read, "decode": f.cpu["decode"] - read}
    row = key | {"views": f.views} | {column: 1e3 * cpu[column] / f.views for column in COLUMNS}
    row |= {"views_per_s": f.views / f.seconds, "demand": demand}
    row["workers_ms"] = {title: 1e3 * seconds / f.views for title, seconds in f.workers.items()}
    if f.steady_seconds > 0:
        cores = f.steady_driver / f.steady_seconds
        row |= {"driver_cores": cores, "driver_per_10k_at_demand": 1e4 * cores / demand}
    return row


HEADER = (
    "| nodes | actors a node | storage | K | scores | job | views | read | decode | scorer | commit | driver "
    "| daemons | other | S3 server | views/s (demand) | driver cores, steady "
    "| driver CPU-s per 10k views at the demand |\n" + "|---" * 18 + "|"
)


def format_row(r: dict) -> str:
    cells = " | ".join(f"{r[c]:.3f}" for c in COLUMNS)
    steady = (
        f"{r['driver_cores']:.3f} | {r['driver_per_10k_at_demand']:.2f}"
        if "driver_cores" in r
        else "n/a | n/a"
    )
    return (
        f"| {r['nodes']} | {r['actors']} | {r['storage']} | {r['K']} | {r['scores']} | {r['job']} "
        f"| {r['views']} | {cells} "
        f"| {r['views_per_s']:.0f} ({r['demand']:g}) | {steady} |"
    )


def marginal_row(small: dict, big: dict) -> dict:
    """What the larger job's extra views cost, column by column: each job's fixed costs cancel."""
    views = big["views"] - small["views"]
    seconds = big["views"] / big["views_per_s"] - small["views"] / small["views_per_s"]

    def extra(column: str) -> float:  # the extra CPU ms, per extra view
        return (big[column] * big["views"] - small[column] * small["views"]) / views

    row = {**big, "job": "marginal", "views": views, "views_per_s": views / seconds, "workers_ms": {}}
    row |= {column: extra(column) for column in COLUMNS}
    row["fixed_s"] = {column: (small[column] - row[column]) * small["views"] / 1e3 for column in COLUMNS}
    cores = row["driver"] * views / 1e3 / seconds
    row |= {"driver_cores": cores, "driver_per_10k_at_demand": 1e4 * cores / row["demand"]}
    by_the_view = sum(row[column] for column in MACHINERY if column not in PER_SECOND)
    per_second = sum(row[column] for column in PER_SECOND) * row["views_per_s"] / 1e3  # cores
    row["machinery"] = sum(row[column] for column in MACHINERY)
    row["machinery_at_demand"] = by_the_view + 1e3 * per_second / row["demand"]
    return row | {"per_second_cores": per_second}


@dataclass
class Inputs:
    """What the jobs read and where they write."""

    corpora: dict[tuple[str, int], str]  # (storage, images) -> the corpus's folder or prefix
    reads: dict[tuple[str, int], float]  # (storage, images) -> CPU seconds reading it (`read_seconds`)
    outputs: dict[str, str]  # storage -> where the jobs write
    warm: str  # the warm-up job's corpus (local)
    mae: Path
    moto: local.Server | None


def bench_cluster(nodes: int, inputs: Inputs, cfg: FeedConfig) -> list[dict]:
    cluster = LocalCluster(nodes, cfg.node_cpus, "ltrp-feed-", int(cfg.object_store_gb * 2**30))
    rows = []
    try:
        ray.init(address=cluster.address, _node_ip_address="127.0.0.1")
        cluster.wait_for_nodes(nodes, cfg.node_cpus)
        check_same_code()
        meter, sampler = MachineCPU(cluster, inputs.moto), WorkerSampler(cluster)
        job = ScoreConfig(
            source="", mae=str(inputs.mae), output="", shard_size=cfg.shard_size, batch_size=cfg.batch_size,
            worker_cpus=cfg.actor_cpus, device="cpu",
        )  # fmt: skip
        # A shard an image: a decode task on each logical CPU, so that the jobs measured start no workers.
        warm = replace(job, source=inputs.warm, output=f"{inputs.outputs['local']}/warm-{nodes}", views=1,
                       shard_size=1)  # fmt: skip
        run_job(warm, cfg.rate, meter, sampler)
        for storage, actors, k, scores in product(cfg.storage, cfg.actors, cfg.views, cfg.scores):
            key = {"nodes": nodes, "actors": actors, "storage": storage, "K": k, "scores": scores}
            jobs = []
            for images in cfg.images:
                out = f"{inputs.outputs[storage]}/n{nodes}-a{actors}-k{k}-s{scores}-i{images}"
                run = replace(job, source=inputs.corpora[storage, images], output=out, views=k,
                              mask_ratio=MASK_RATIOS[scores], workers=nodes * actors)  # fmt: skip
                figures = run_job(run, cfg.rate, meter, sampler)
                jobs.append(row_of(figures, inputs.reads[storage, images], key | {"job": str(images)},
                                   cfg.rate * nodes * actors))  # fmt: skip
                _print(jobs[-1])
            if len(jobs) == 2:
                jobs.append(marginal_row(*sorted(jobs, key=lambda row: row["views"])))
                _print(jobs[-1])
            rows += jobs
    finally:
        ray.shutdown()
        cluster.stop()
    return rows


def _print(row: dict) -> None:
    print(format_row(row), flush=True)
    workers = ", ".join(f"{title} {ms:.3f}" for title, ms in row["workers_ms"].items() if ms >= 0.01)
    if "fixed_s" in row:
        fixed = ", ".join(f"{column} {seconds:.1f}" for column, seconds in row["fixed_s"].items())
        print(
            f"  machinery ({'+'.join(MACHINERY)}): {row['machinery']:.3f} ms a view at "
            f"{row['views_per_s']:.0f} views/s, of which {'+'.join(PER_SECOND)} "
            f"{row['per_second_cores']:.3f} cores: {row['machinery_at_demand']:.3f} ms a view at the "
            "demand if those cores stay",
            flush=True,
        )
        print(
            f"  fixed CPU-s a job (the smaller job's less its views at the marginal cost): {fixed}",
            flush=True,
        )
    if workers:
        print(
            f"  workers' CPU ms/view by title (in the operators' columns and in other): {workers}", flush=True
        )


@contextlib.contextmanager
def s3_bucket() -> Iterator[local.Server]:
    """A moto S3 server with BUCKET in it, and this process's environment (which the Ray nodes started
    meanwhile inherit) pointing at it with dummy credentials, restored at the end."""
    with local.moto_server() as moto:
        settings = {"AWS_ENDPOINT_URL_S3": moto.url, "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
        with mock.patch.dict(os.environ, settings):
            fsspec.filesystem("s3").mkdir(BUCKET)
            yield moto


def main(argv: list[str] | None = None) -> list[dict]:
    cfg = tyro.cli(FeedConfig, args=argv, prog="python -m jobs.bench.feed", description=__doc__)
    if len(cfg.images) > 2 or len(set(cfg.images)) < len(cfg.images):
        raise SystemExit(
            f"--images: one size, or two different ones for the marginal row; got {list(cfg.images)}"
        )
    with tempfile.TemporaryDirectory(prefix="ltrp-feed-") as tmp, contextlib.ExitStack() as stack:
        root = Path(tmp)
        corpora = {
            ("local", n): str(write_corpus(root / f"corpus-{n}", n, cfg.photo_side)) for n in cfg.images
        }
        warm = str(write_corpus(root / "warm", cfg.node_cpus * max(cfg.nodes), cfg.photo_side))
        outputs = {"local": str(root / "out")}
        moto = None
        if "s3" in cfg.storage:
            moto = stack.enter_context(s3_bucket())
            corpora |= {
                ("s3", n): upload(Path(corpora["local", n]), f"{BUCKET}/corpus-{n}") for n in cfg.images
            }
            outputs["s3"] = f"{BUCKET}/out"
        mae = root / "mae_b.pth"
        ltrp.save_mae(ltrp.MAE(ltrp.GEOMETRIES["mae_vit_base_patch16"]), str(mae), dtype=torch.float16)
        reads = {key: read_seconds(source, cfg.shard_size) for key, source in corpora.items()}
        inputs = Inputs(corpora, reads, outputs, warm, mae, moto)
        print(HEADER, flush=True)
        rows = [row for nodes in cfg.nodes for row in bench_cluster(nodes, inputs, cfg)]
    if cfg.json is not None:
        cfg.json.write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
