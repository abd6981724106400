"""The deployment files at work: a real two-node Ray cluster on this machine, with token authentication
on as cluster/ configures it, runs the scoring and training jobs submitted through the Ray Jobs API
with cluster/runtime_env.yaml, against a moto S3 server and an MLflow server, and refuses a submission
without the token. What the files say without a cluster: test_cluster_files.py."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import string
import subprocess
import tempfile
import time
from collections.abc import Iterator

import psutil
import pyarrow.parquet as pq
import pytest
import s3fs
import torch
import yaml
from conftest import BIN, fashion_mnist_pngs, free_port, wait_for_port
from mlflow.tracking import MlflowClient
from test_cluster_files import ROOT, RUNTIME_ENV, SETTINGS

import ltrp

TOKEN = secrets.token_hex(32)  # this cluster's token: its nodes have it, and so does an allowed submitter
AUTH = {"Authorization": f"Bearer {TOKEN}"}  # what `ray job submit` sends with RAY_AUTH_TOKEN set


def _node_env() -> dict:
    """The environment of the Ray nodes: none of the settings, so that a job only has them if they
    travelled in its runtime env, as on a real cluster; token authentication on, as cluster/ sets it
    (RAY_AUTH_TOKEN here; the launcher mounts the token file, KubeRay takes it from a Secret)."""
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS and not k.startswith("RAY_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # `python` in an entrypoint: this venv's
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN"] = TOKEN
    return env


def _ports(*names: str) -> list[str]:
    """Flags for the ports a node would otherwise take at fixed defaults (other Rays may run here)."""
    return [f"--{name}={free_port()}" for name in names]


def _start_node(args: list[str], temp_dir: str) -> subprocess.Popen:
    """`ray start --block` in its own process group, so that it and every process it starts can be
    stopped together without touching any other Ray on this machine (which `ray stop` would)."""
    return subprocess.Popen(
        [
            BIN / "ray",
            "start",
            "--block",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=2",  # the machine has 2 cores; 4 logical CPUs in all keep Ray Data from waiting
            "--num-gpus=0",
            "--object-store-memory=200000000",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
            *_ports("node-manager-port", "object-manager-port", "runtime-env-agent-port"),
            *_ports("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port"),
            *args,
        ],
        env=_node_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _stop(procs: list[subprocess.Popen], marks: list[str]) -> None:
    """SIGKILL to each node's process group (ray start, its raylet, GCS and workers: a throwaway
    cluster needs no graceful stop, which took 20 s), then to whatever of ours is left: processes whose
    command line names our temp dir or GCS port."""
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    leftovers = _ours(marks)
    for p in leftovers:
        p.kill()
    psutil.wait_procs(leftovers, timeout=10)


def _ours(marks: list[str]) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if any(m in cmdline for m in marks) and p.pid != os.getpid():
            found.append(p)
    return found


@pytest.fixture(scope="module")
def cluster(s3_endpoint: str) -> Iterator[tuple[str, list[str]]]:
    """A head (GCS, dashboard and job server) and a worker node, two `ray start` processes on
    127.0.0.1 with ports of their own: (the Jobs API address, marks that find our processes)."""
    from ray.util.state import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    # One temp dir per node, as on separate machines: nodes that share one unpack the job's working
    # dir into the same folder and delete it under each other. Short paths: Unix sockets are capped.
    temp_dirs = [tempfile.mkdtemp(prefix="ltrp-ray-", dir="/tmp") for _ in range(2)]
    gcs, dashboard = free_port(), free_port()
    marks = [*temp_dirs, f"127.0.0.1:{gcs}"]
    head = _start_node(
        [
            "--head",
            f"--port={gcs}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            *_ports("ray-client-server-port"),
        ],
        temp_dirs[0],
    )
    procs = [head]
    try:
        wait_for_port(gcs, head, timeout=60)
        procs.append(_start_node([f"--address=127.0.0.1:{gcs}"], temp_dirs[1]))
        wait_for_port(dashboard, head, timeout=60)
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.monotonic() + 90
        while True:
            try:
                nodes = StateApiClient(address, headers=AUTH).list(
                    StateResource.NODES, ListApiOptions(), raise_on_missing_output=False
                )
                if len([n for n in nodes if n.state == "ALIVE"]) == 2:
                    break
            except Exception:
                if time.monotonic() > deadline:
                    raise
            assert time.monotonic() < deadline, "the worker node did not join"
            time.sleep(0.5)
        yield address, marks
    finally:
        _stop(procs[::-1], marks)
        for temp_dir in temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)


def _runtime_env(values: dict[str, str]) -> dict:
    """cluster/runtime_env.yaml rendered as the README's envsubst does (a missing value fails here),
    plus the checkout as the working dir, as `--working-dir .` gives."""
    text = string.Template(RUNTIME_ENV.read_text()).substitute(values)
    return {**yaml.safe_load(text), "working_dir": str(ROOT)}


def _submit(address: str, command: str, values: dict[str, str]) -> str:
    """Submits `python -m COMMAND` and waits for it to succeed; returns its logs. The entrypoint
    first checks that the uploaded working dir is the checkout without .venv and .git."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address, headers=AUTH)
    entrypoint = f"test -f pyproject.toml && test ! -e .venv && test ! -e .git && python -m {command}"
    job = client.submit_job(entrypoint=entrypoint, runtime_env=_runtime_env(values))
    deadline = time.monotonic() + 420
    while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED}:
        assert status != JobStatus.STOPPED and time.monotonic() < deadline, client.get_job_logs(job)[-5000:]
        time.sleep(1)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-5000:]
    print(f"submitted with the token: {job} {status.value}")  # the README's evidence (pytest -s)
    return logs


@pytest.fixture(scope="module")
def settings(s3_endpoint: str, mlflow_uri: str) -> dict[str, str]:
    """What the person submitting has in their environment."""
    return {k: os.environ.get(k, "") for k in SETTINGS if k != "MLFLOW_TRACKING_URI"} | {
        "MLFLOW_TRACKING_URI": mlflow_uri
    }


@pytest.fixture(scope="module")
def scored(cluster: tuple[str, list[str]], settings: dict[str, str], tmp_path_factory) -> tuple[str, str]:
    """The scoring job, submitted: 64 Fashion-MNIST PNGs and a tiny MAE on S3 -> scores on S3."""
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("cluster")
    fs.pipe({f"cluster/images/{name}": png for name, png in fashion_mnist_pngs(64).items()})
    torch.manual_seed(0)
    mae = tmp_path_factory.mktemp("mae") / "tiny.pth"
    ltrp.save_mae(ltrp.MAE(ltrp.GEOMETRIES["mae_vit_tiny_patch8"]), str(mae))
    fs.put_file(str(mae), "cluster/mae.pth")
    out = "s3://cluster/scores/run1"
    logs = _submit(
        cluster[0],
        "jobs.score --source s3://cluster/images/ --mae s3://cluster/mae.pth --output s3://cluster/scores/run1"
        " --views 2 --mask-ratio 0.75 --shard-size 32 --scorer-cpus 0.5",
        settings,
    )
    return out, logs


@pytest.mark.slow
def test_a_submission_without_the_token_is_refused(cluster: tuple[str, list[str]]) -> None:
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    for headers in ({}, {"Authorization": f"Bearer {secrets.token_hex(32)}"}):  # none, or a wrong one
        with pytest.raises(AuthenticationError, match=r"Authentication (required|failed)") as refused:
            JobSubmissionClient(cluster[0], headers=headers).submit_job(entrypoint="touch /tmp/ltrp-pwned")
        print(f"submitted without the token: refused: {str(refused.value).splitlines()[0]}")
    assert not os.path.exists("/tmp/ltrp-pwned")


@pytest.mark.slow
def test_submitted_scoring_job_writes_to_s3_and_mlflow(scored: tuple[str, str], mlflow_uri: str) -> None:
    out, logs = scored
    assert "scored 64 images (128 rows)" in logs and "0 errors" in logs
    table = pq.read_table(f"{out}/scores")  # from the moto server, through AWS_ENDPOINT_URL_S3
    assert table.num_rows == 128 and len(set(table.column("image_id").to_pylist())) == 64
    assert {len(v) for v in table.column("visible").to_pylist()} == {16}  # 64 patches, 3/4 masked
    assert s3fs.S3FileSystem(skip_instance_cache=True).exists(f"{out}/_SUCCESS")

    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("ltrp-score").experiment_id],
        filter_string=f"tags.output_uri = '{out}'",
    )
    assert run.data.metrics["images_scored"] == 64 and run.data.params["mae"] == "s3://cluster/mae.pth"


@pytest.mark.slow
def test_submitted_training_job_checkpoints_to_s3_and_registers(
    scored: tuple[str, str], cluster: tuple[str, list[str]], settings: dict[str, str], mlflow_uri: str
) -> None:
    out, _ = scored
    logs = _submit(
        cluster[0],
        f"jobs.train --scores {out} --storage s3://cluster/train --name run1 --ranker ltrp_vit_micro_patch8"
        " --epochs 1 --warmup-epochs 0 --batch-size 16 --worker-cpus 0.5 --model models:/ltrp-cluster"
        " --alias candidate",
        settings,
    )
    assert "registered ltrp-cluster version 1 as @candidate" in logs
    assert any(
        "checkpoint" in p for p in s3fs.S3FileSystem(skip_instance_cache=True).ls("cluster/train/run1")
    )
    version = MlflowClient(mlflow_uri).get_model_version_by_alias("ltrp-cluster", "candidate")
    assert version.tags["score_table"] == out and len(version.tags["mae_sha256"]) == 64
