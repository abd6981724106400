"""Where the jobs run, written once: the Ray cluster they join and the MLflow server they log to."""

from __future__ import annotations

import math
import os
import socket
import sys
from urllib.parse import urlsplit

import mlflow
import ray
import ray.data

from ltrp.core.options import Device
from ltrp.pipeline.configs import InputError

TRACKING_URI = "MLFLOW_TRACKING_URI"
#: Set by Ray in the entrypoint process of a submitted job (its runtime env and metadata, as JSON).
SUBMITTED_JOB = "RAY_JOB_CONFIG_JSON_ENV_VAR"
#: Ray Data's number of Parquet footer-reader actors per read (its default: 32).
PARQUET_FOOTER_READERS = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
#: MLflow's switch of its artifact download and upload progress bars.
MLFLOW_PROGRESS_BAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, default a SQLite file here; a relative SQLite path is made absolute,
    because Ray workers, which log too, run in other working directories.

    Raises:
        InputError: the variable is set but blank (a template that rendered an unset variable as ""), or
            the job runs on a remote Ray cluster or as a submitted Ray job and the store is local (unset,
            sqlite: or a file path): runs and models would go to a file on one node, lost with it.
    """
    uri = os.environ.get(TRACKING_URI)
    if uri is not None and not uri.strip():
        raise InputError(
            f"{TRACKING_URI} is set but empty (a template that rendered an unset variable?): set it to "
            "the tracking server's URI, or unset it for a SQLite file in this folder"
        )
    uri = uri or "sqlite:///mlflow.db"
    cluster = remote_cluster()
    if cluster and _local_store(uri):
        raise InputError(
            f"{TRACKING_URI} is {os.environ.get(TRACKING_URI, 'unset')!r}, a store on this node, and the job "
            f"runs {cluster}: its runs and models would be lost with the node. Set {TRACKING_URI} to the "
            "tracking server (e.g. http://mlflow:5000)"
        )
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        uri = prefix + os.path.abspath(uri[len(prefix) :])
    return uri


def remote_cluster() -> str | None:
    """Where the job runs, if not on this machine alone: as a submitted Ray job (`ray job submit`, a
    KubeRay RayJob) or on the cluster a non-local RAY_ADDRESS names; None otherwise."""
    if SUBMITTED_JOB in os.environ:
        return "as a submitted Ray job"
    address = os.environ.get("RAY_ADDRESS", "")
    host = urlsplit(address if "://" in address else f"ray://{address}").hostname or ""
    if host and host not in {"auto", "local"} and not _this_machine(host):
        return f"on the Ray cluster at RAY_ADDRESS={address}"
    return None


def _this_machine(host: str) -> bool:
    """Whether `host` names this machine: an address a socket here can bind to (a local Ray's GCS
    address is this node's IP, not 127.0.0.1)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
    except OSError:  # not resolvable here: not this machine
        return False
    for family, kind, _, _, address in infos:
        with socket.socket(family, kind) as probe:
            try:
                probe.bind((address[0], 0))
            except OSError:
                continue
            return True
    return False


def _local_store(uri: str) -> bool:
    """Whether an MLflow tracking URI is a file on this machine (a SQLite database or a file store)."""
    scheme = urlsplit(uri).scheme
    return scheme in {"", "file", "sqlite"}


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
    # Off a terminal (a submitted job's log, a file), Ray Data's progress bars become ~7 log lines every
    # 10 s; the jobs print their own line per committed shard or epoch instead.
    ray.data.DataContext.get_current().enable_progress_bars = sys.stdout.isatty()
    track(experiment)


def track(experiment: str | None = None) -> None:
    """Points MLflow at `tracking_uri()`, in `experiment` if given."""
    quiet_off_a_terminal()
    mlflow.set_tracking_uri(tracking_uri())
    if experiment:
        mlflow.set_experiment(experiment)


def quiet_off_a_terminal() -> None:
    """Off a terminal (a job's log, a file), no MLflow artifact progress bar: it logs a redraw per
    file, 64 for one ranker. A user's own setting stays."""
    if not sys.stderr.isatty():
        os.environ.setdefault(MLFLOW_PROGRESS_BAR, "false")


def cluster_gpus() -> int:
    """GPUs in the Ray cluster this process is connected to (0 when not connected)."""
    return int(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0


def use_gpu(device: Device) -> bool:
    """Every job's one rule for `--device`: auto uses GPUs when the cluster has them; gpu insists."""
    gpus = cluster_gpus()
    if device == "gpu" and not gpus:
        raise RuntimeError("--device gpu: the Ray cluster has no GPUs (use --device auto or cpu)")
    return device == "gpu" or (device == "auto" and gpus > 0)
