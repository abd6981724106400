"""Benchmark: planning an S3 corpus, a folder and a manifest, in time and memory.

    python -m jobs.bench.planning                      # 50,000 objects in 50 class folders, shards of 256
    python -m jobs.bench.planning --objects 100000 --classes 100    # over 5 minutes here

Starts a moto S3 server on 127.0.0.1 in this process (stopped at the end) and stores N tiny objects
laid out as an ImageFolder corpus (`corpus/cls{k:03d}/img{i:07d}.jpg`) and a Parquet manifest of the
same N uris straight into moto's backend: uploads through moto's HTTP API ran at ~100 objects/s here
(10,000 in 96 s), 16 minutes for the default. Then it measures, each in a fresh interpreter (so that
one does not reuse memory another freed), with s3fs talking to the server over HTTP:

- folder, `plan_corpus(prefix, shard_size)`: the streaming planner, shards and all;
- manifest, `plan_corpus(manifest, shard_size)`.

(The full listings the streaming planner replaced were measured beside it until commit d29cc9d; their
figures are in docs/benchmarks.md.)

Per source, after a warm-up on a 3-object corpus (lazy imports, the S3 client's service model), from
one run with tracemalloc on (a second, untraced run would double the time):
seconds, objects/s, peak Python memory (tracemalloc), the peak of Arrow's memory pool (which
tracemalloc does not see), and RSS growth (resident memory after the run, its result still held, minus
before), with tracemalloc's own memory for its traces at that point, which the RSS growth includes.
Then the seconds and peaks linearly extrapolated to 10^7 objects.

Listing speed here is moto's, not S3's: moto scans its whole key set for every listing request (a page
of up to 1,000 keys, or one folder), so a listing's time grows with N squared. At 100,000 objects
a full listing (`sorted(fs.find)`) alone took 150 s: hence the default of 50,000. The memory figures
are the planner's.
"""

from __future__ import annotations

import io
import logging
import multiprocessing
import os
import time
import tracemalloc
from dataclasses import dataclass

import fsspec
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import tyro
from moto.backends import get_backend
from moto.core.models import DEFAULT_ACCOUNT_ID
from moto.server import ThreadedMotoServer

from ltrp.data.sources import plan_corpus

BUCKET = "bench-planning"
EXTRAPOLATE_TO = 10**7


@dataclass
class PlanningBenchConfig:
    """Planning an S3 corpus, a folder and a manifest: seconds and memory."""

    objects: int = 50_000  # objects in the corpus (and rows in the manifest)
    classes: int = 50  # class folders they are spread over
    shard_size: int = 256  # images per shard


@dataclass(frozen=True)
class Measure:
    """One method's figures."""

    seconds: float
    peak_bytes: int  # tracemalloc peak
    rss_growth_bytes: int
    tracemalloc_bytes: int  # tracemalloc's own memory at the end, part of the RSS growth
    arrow_peak_bytes: int  # Arrow's memory pool's peak, which tracemalloc does not see


def start_moto() -> ThreadedMotoServer:
    """moto's server on a free port, with this process's environment (inherited by the measuring
    interpreters) pointing s3fs at it with dummy credentials."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(
        AWS_ENDPOINT_URL_S3=f"http://{host}:{port}",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    return server


def _store(cfg: PlanningBenchConfig) -> None:
    """The corpus's objects (8-byte bodies) and its manifest, put straight into moto's backend; and a
    corpus of 3 objects and its manifest, for warming up the code paths a method takes."""
    fsspec.filesystem("s3", skip_instance_cache=True).mkdir(BUCKET)
    backend = get_backend("s3")[DEFAULT_ACCOUNT_ID]["global"]
    for prefix, objects in (("corpus", cfg.objects), ("warmup", 3)):
        classes = min(cfg.classes, objects)
        keys = [f"{prefix}/cls{i * classes // objects:03d}/img{i:07d}.jpg" for i in range(objects)]
        for key in keys:
            backend.put_object(BUCKET, key, b"\xff\xd8\xff\xe0jpeg")
        uris = [f"s3://{BUCKET}/{key}" for key in keys]
        labels = [key.split("/")[1] for key in keys]
        buffer = io.BytesIO()
        pq.write_table(pa.table({"uri": uris, "label": labels}), buffer)
        backend.put_object(BUCKET, f"{prefix}.parquet", buffer.getvalue())


def _measure(source: str, warmup: str, shard_size: int) -> Measure:
    """Runs in a fresh interpreter: the planner on `warmup` (lazy imports, the client's service model:
    not the planner's memory), then once on `source`, measured, under tracemalloc."""
    plan_corpus(warmup, shard_size)
    process = psutil.Process()
    rss_before = process.memory_info().rss
    tracemalloc.start()
    start = time.perf_counter()
    result = plan_corpus(source, shard_size)
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    rss_growth = process.memory_info().rss - rss_before
    own = tracemalloc.get_tracemalloc_memory()
    tracemalloc.stop()
    del result
    return Measure(seconds, peak, rss_growth, own, pa.default_memory_pool().max_memory())


def _report(label: str, measure: Measure, objects: int) -> None:
    mib, gib = 1 << 20, 1 << 30
    rate = objects / measure.seconds
    print(
        f"{label}: {measure.seconds:.2f} s, {rate:.0f} objects/s, tracemalloc peak "
        f"{measure.peak_bytes / mib:.1f} MiB, Arrow pool peak {measure.arrow_peak_bytes / mib:.1f} MiB, "
        f"RSS growth {measure.rss_growth_bytes / mib:.1f} MiB "
        f"(of which tracemalloc's own {measure.tracemalloc_bytes / mib:.1f} MiB)",
        flush=True,
    )
    scale = EXTRAPOLATE_TO / objects
    print(
        f"{label}: LINEAR EXTRAPOLATION to {EXTRAPOLATE_TO:,} objects from this run's measured rate and "
        f"peaks, not measured: {EXTRAPOLATE_TO / rate:.0f} s, tracemalloc peak "
        f"{measure.peak_bytes * scale / gib:.2f} GiB, "
        f"Arrow pool peak {measure.arrow_peak_bytes * scale / gib:.2f} GiB",
        flush=True,
    )


def main() -> None:
    cfg = tyro.cli(PlanningBenchConfig, prog="python -m jobs.bench.planning", description=__doc__)
    moto = start_moto()
    try:
        start = time.perf_counter()
        _store(cfg)
        print(f"stored {cfg.objects} objects and their manifest in moto: {time.perf_counter() - start:.1f} s")
        folder, manifest = f"s3://{BUCKET}/corpus", f"s3://{BUCKET}/corpus.parquet"
        warm_folder, warm_manifest = f"s3://{BUCKET}/warmup", f"s3://{BUCKET}/warmup.parquet"
        runs = [
            ("folder plan_corpus [streaming]", folder, warm_folder),
            ("manifest plan_corpus [arrow]", manifest, warm_manifest),
        ]
        tag = f"planning {cfg.objects} objects, {cfg.classes} folders, shard size {cfg.shard_size}"
        # A fresh interpreter per source: RSS growth is then not memory another run freed.
        spawn = multiprocessing.get_context("spawn")
        for label, source, warmup in runs:
            with spawn.Pool(1) as pool:
                measure = pool.apply(_measure, (source, warmup, cfg.shard_size))
            _report(f"{tag}: {label}", measure, cfg.objects)
    finally:
        moto.stop()


if __name__ == "__main__":
    main()
