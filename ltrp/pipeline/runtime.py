"""Where the jobs run, written once: the Ray cluster they join and the MLflow server they log to."""

from __future__ import annotations

import math
import os

import mlflow
import ray

from ltrp.core.options import Device

#: Ray Data's number of Parquet footer-reader actors per read (its default: 32).
PARQUET_FOOTER_READERS = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, default a SQLite file here; a relative SQLite path is made absolute,
    because Ray workers, which log too, run in other working directories."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        uri = prefix + os.path.abspath(uri[len(prefix) :])
    return uri


def local_resources(workers: int, worker_cpus: float) -> dict:
    """For a Ray started here (no RAY_ADDRESS): enough logical CPUs that the data-loading tasks still
    run beside the train workers. Reserving every core for workers deadlocks small machines (2 cores,
    2 workers: reading the score table waited forever). And, unless set, no more Parquet footer
    readers than CPUs: Ray Data starts up to 32 footer-reader processes for every Parquet read, which
    cost a 2-core machine 10-20 s of each training launch (two reads of a two-file score table)."""
    if os.environ.get("RAY_ADDRESS"):
        return {}
    cpus = max(os.cpu_count() or 1, math.ceil(workers * worker_cpus) + 2)
    readers = os.environ.get(PARQUET_FOOTER_READERS, str(cpus))
    return {"num_cpus": cpus, "runtime_env": {"env_vars": {PARQUET_FOOTER_READERS: readers}}}


def start(experiment: str | None = None, *, workers: int = 1, worker_cpus: float = 1.0) -> None:
    """Joins the Ray cluster that RAY_ADDRESS names, or starts a local one sized for `workers` train
    workers (unless this process is already connected: the pipeline runs every job in one session),
    then `track(experiment)`."""
    if not ray.is_initialized():
        ray.init(**local_resources(workers, worker_cpus))
    track(experiment)


def track(experiment: str | None = None) -> None:
    """Points MLflow at `tracking_uri()`, in `experiment` if given."""
    mlflow.set_tracking_uri(tracking_uri())
    if experiment:
        mlflow.set_experiment(experiment)


def cluster_gpus() -> int:
    """GPUs in the Ray cluster this process is connected to (0 when not connected)."""
    return int(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0


def use_gpu(device: Device) -> bool:
    """Every job's one rule for `--device`: auto uses GPUs when the cluster has them; gpu insists."""
    gpus = cluster_gpus()
    if device == "gpu" and not gpus:
        raise RuntimeError("--device gpu: the Ray cluster has no GPUs (use --device auto or cpu)")
    return device == "gpu" or (device == "auto" and gpus > 0)
