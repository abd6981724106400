"""The deployment files at work: a real two-node Ray cluster on this machine, with token authentication
on as cluster/ configures it, runs the scoring and training jobs submitted through the Ray Jobs API
with cluster/runtime_env.yaml, against a moto S3 server and an MLflow server, and refuses a submission
without the token. Both jobs lose their worker node mid-run (every process on it killed, a fresh node
started) and still end with the output of a run that lost nothing. What the files say without a
cluster: test_cluster_files.py."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import shutil
import signal
import string
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
import torch
import yaml
from conftest import BIN, fashion_mnist_pngs, free_port, wait_for_port
from mlflow.tracking import MlflowClient
from test_cluster_files import ROOT, RUNTIME_ENV, SETTINGS

import ltrp
from ltrp.data.sources import plan_corpus
from ltrp.pipeline import runtime, score_job, trainer
from ltrp.pipeline.configs import ScoreConfig
from ltrp.pipeline.shards import decode_shards

TOKEN = secrets.token_hex(32)  # this cluster's token: its nodes have it, and so does an allowed submitter
AUTH = {"Authorization": f"Bearer {TOKEN}"}  # what `ray job submit` sends with RAY_AUTH_TOKEN set


def _node_env(head: bool) -> dict:
    """The environment of the Ray nodes: none of the settings, so that a job only has them if they
    travelled in its runtime env, as on a real cluster; token authentication on, as cluster/ sets it
    (RAY_AUTH_TOKEN here; the launcher mounts the token file, KubeRay takes it from a Secret)."""
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS and not k.startswith("RAY_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # `python` in an entrypoint: this venv's
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN"] = TOKEN
    env[runtime.PARQUET_FOOTER_READERS] = "4"  # as many as the worker node's CPUs, not Ray Data's 32
    if head:  # a lost node declared dead after ~3 s of failed health checks, not Ray's default ~15 s
        env |= {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}
    return env


def _ports(*names: str) -> list[str]:
    """Flags for the ports a node would otherwise take at fixed defaults (other Rays may run here)."""
    return [f"--{name}={free_port()}" for name in names]


class LocalCluster:
    """A Ray cluster of `ray start` processes on 127.0.0.1 with ports of their own: a head (GCS,
    dashboard and job server) with no CPUs, as cluster/ starts it, so every task and actor of a job runs
    on the worker node, which can be lost and replaced mid-job as a cloud machine can.

    Each node is one process group (`ray start --block` and every process it starts), so it can be
    stopped without touching any other Ray on this machine (which `ray stop` would), and has a temp dir
    of its own, as on separate machines: nodes that share one unpack a job's working dir into the same
    folder and delete it under each other. Short paths: Unix sockets are capped."""

    def __init__(self) -> None:
        self.gcs, dashboard = free_port(), free_port()
        self.address = f"http://127.0.0.1:{dashboard}"  # the Jobs API
        self.head = self._start(
            [
                "--head",
                "--num-cpus=0",
                f"--port={self.gcs}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard}",
                *_ports("ray-client-server-port"),
            ],
        )
        wait_for_port(self.gcs, self.head[0], timeout=60)
        self.worker = self._start_worker()
        wait_for_port(dashboard, self.head[0], timeout=60)
        self.wait_for_nodes(2)

    def _start(self, args: list[str]) -> tuple[subprocess.Popen, str]:
        temp_dir = tempfile.mkdtemp(prefix="ltrp-ray-", dir="/tmp")
        proc = subprocess.Popen(
            [
                BIN / "ray",
                "start",
                "--block",
                "--node-ip-address=127.0.0.1",
                "--num-gpus=0",
                "--object-store-memory=200000000",
                f"--temp-dir={temp_dir}",
                "--disable-usage-stats",
                *_ports("node-manager-port", "object-manager-port", "runtime-env-agent-port"),
                *_ports("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port"),
                *args,
            ],
            env=_node_env(head="--head" in args),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        return proc, temp_dir

    def _start_worker(self) -> tuple[subprocess.Popen, str]:
        # 4 logical CPUs on the machine's 2 cores keep Ray Data's read tasks from waiting on the actors.
        return self._start([f"--address=127.0.0.1:{self.gcs}", "--num-cpus=4"])

    def alive_nodes(self) -> list:
        from ray.util.state import StateApiClient
        from ray.util.state.common import ListApiOptions, StateResource

        nodes = StateApiClient(self.address, headers=AUTH).list(
            StateResource.NODES, ListApiOptions(), raise_on_missing_output=False
        )
        return [n for n in nodes if n.state == "ALIVE"]

    def wait_for_nodes(self, count: int, timeout: float = 90) -> None:
        """Until exactly `count` nodes are alive (a killed node counts until the GCS declares it dead)."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(Exception):  # the dashboard may not answer yet
                if len(self.alive_nodes()) == count:
                    return
            assert time.monotonic() < deadline, f"the cluster did not reach {count} alive nodes"
            time.sleep(0.5)

    def replace_worker(self) -> None:
        """The worker node lost, as a machine is (SIGKILL to all its processes: no goodbye to the GCS),
        and a fresh one started in its place, as an autoscaler would."""
        _kill([self.worker])
        self.wait_for_nodes(1)
        self.worker = self._start_worker()
        self.wait_for_nodes(2)

    def stop(self) -> None:
        """SIGKILL to both nodes (a throwaway cluster needs no graceful stop, which took 20 s)."""
        _kill([self.worker, self.head])


def _kill(nodes: list[tuple[subprocess.Popen, str]]) -> None:
    """SIGKILL to each node's process group, then to whatever else names its temp dir (a process that
    left the group), then its temp dir removed."""
    for proc, _ in nodes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    marks = [temp_dir for _, temp_dir in nodes]
    leftovers = [
        p
        for p in psutil.process_iter(["cmdline"])
        if any(m in " ".join(p.info["cmdline"] or []) for m in marks) and p.pid != os.getpid()
    ]
    for p in leftovers:
        p.kill()
    psutil.wait_procs(leftovers, timeout=10)
    for temp_dir in marks:
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(s3_endpoint: str) -> Iterator[LocalCluster]:
    cluster = LocalCluster()
    try:
        yield cluster
    finally:
        cluster.stop()


def _runtime_env(values: dict[str, str]) -> dict:
    """cluster/runtime_env.yaml rendered as the README's envsubst does (a missing value fails here),
    plus the checkout as the working dir, as `--working-dir .` gives."""
    text = string.Template(RUNTIME_ENV.read_text()).substitute(values)
    return {**yaml.safe_load(text), "working_dir": str(ROOT)}


class Submitted:
    """A job submitted through the Jobs API with the token: `python -m COMMAND`, whose entrypoint first
    checks that the uploaded working dir is the checkout without .venv and .git."""

    def __init__(self, address: str, command: str, values: dict[str, str]) -> None:
        from ray.job_submission import JobSubmissionClient

        self.client = JobSubmissionClient(address, headers=AUTH)
        entrypoint = f"test -f pyproject.toml && test ! -e .venv && test ! -e .git && python -m {command}"
        self.id = self.client.submit_job(entrypoint=entrypoint, runtime_env=_runtime_env(values))

    def status(self):
        return self.client.get_job_status(self.id)

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 300) -> None:
        """Polls `condition` while the job runs; fails if the job ends first or time runs out."""
        from ray.job_submission import JobStatus

        deadline = time.monotonic() + timeout
        while not condition():
            status = self.status()
            assert status in {JobStatus.PENDING, JobStatus.RUNNING}, f"{what}: the job {status.value} first"
            assert time.monotonic() < deadline, f"{what}: not after {timeout} s"
            time.sleep(0.2)

    def finish(self, timeout: float = 420) -> str:
        """Waits for the job to succeed; returns its logs."""
        from ray.job_submission import JobStatus

        deadline = time.monotonic() + timeout
        while (status := self.status()) not in {JobStatus.SUCCEEDED, JobStatus.FAILED}:
            assert status != JobStatus.STOPPED and time.monotonic() < deadline, self.logs()[-5000:]
            time.sleep(1)
        logs = self.logs()
        assert status == JobStatus.SUCCEEDED, logs[-5000:]
        print(f"submitted with the token: {self.id} {status.value}")  # the README's evidence (pytest -s)
        return logs

    def logs(self) -> str:
        return self.client.get_job_logs(self.id)


def _actor_started(cluster: LocalCluster, class_name: str) -> bool:
    """Whether an actor of `class_name` is being created or alive (on the worker node: the head has no
    CPUs)."""
    from ray.util.state import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    actors = StateApiClient(cluster.address, headers=AUTH).list(
        StateResource.ACTORS,
        ListApiOptions(filters=[("class_name", "=", class_name)]),
        raise_on_missing_output=False,
    )
    return any(a.state in {"PENDING_CREATION", "ALIVE"} for a in actors)


@pytest.fixture(scope="module")
def settings(s3_endpoint: str, mlflow_uri: str) -> dict[str, str]:
    """What the person submitting has in their environment."""
    return {k: os.environ.get(k, "") for k in SETTINGS if k != "MLFLOW_TRACKING_URI"} | {
        "MLFLOW_TRACKING_URI": mlflow_uri
    }


#: The submitted scoring job's settings (its MAE: a tiny one, 64 px, an 8x8 grid).
SCORING = ScoreConfig(
    source="s3://cluster/images/",
    mae="s3://cluster/mae.pth",
    output="s3://cluster/scores/run1",
    views=2,
    mask_ratio=0.75,
    shard_size=8,
    scorer_cpus=0.5,
)


@pytest.fixture(scope="module")
def scored(cluster: LocalCluster, settings: dict[str, str], tmp_path_factory) -> tuple[str, str, str]:
    """The scoring job, submitted: 64 Fashion-MNIST PNGs and a tiny MAE on S3 -> scores on S3; its
    worker node lost mid-job. Returns the output, the job's logs and the MAE's local copy."""
    from ray.job_submission import JobStatus

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("cluster")
    fs.pipe({f"cluster/images/{name}": png for name, png in fashion_mnist_pngs(64).items()})
    torch.manual_seed(0)
    mae = str(tmp_path_factory.mktemp("mae") / "tiny.pth")
    ltrp.save_mae(ltrp.MAE(ltrp.GEOMETRIES["mae_vit_tiny_patch8"]), mae)
    fs.put_file(mae, "cluster/mae.pth")
    command = f"jobs.score --source {SCORING.source} --mae {SCORING.mae} --output {SCORING.output}"
    command += f" --views {SCORING.views} --mask-ratio {SCORING.mask_ratio} --shard-size {SCORING.shard_size}"
    command += f" --scorer-cpus {SCORING.scorer_cpus}"
    job = Submitted(cluster.address, command, settings)
    # While the decode tasks run and the scorer actor starts (~30 s here; scoring itself takes ~3 s).
    job.wait_for(lambda: _actor_started(cluster, "MapWorker(MapBatches(ShardScorer))"), "a scorer")
    cluster.replace_worker()  # with the decode tasks, their blocks in its object store, the scorer
    assert job.status() == JobStatus.RUNNING  # the node was lost mid-job
    return SCORING.output, job.finish(), mae


def _fault_free_table(mae: str) -> pa.Table:
    """What the scoring job writes when nothing fails: its two stages (decode, score) called as plain
    functions in this process, on every shard of the corpus at once."""
    cfg = dataclasses.replace(SCORING, mae=mae)
    shards = plan_corpus(cfg.source, cfg.shard_size).shards
    decoded = decode_shards(
        {"shard": np.array([s.to_json() for s in shards])},
        image_rows=partial(score_job.image_rows, cfg=cfg, size=64, grid=8),
        schema=score_job.STAGE_SCHEMA,
    )
    return score_job.ShardScorer(cfg, ltrp.load_mae(mae).checkpoint.sha256, gpu=False)(decoded)


@pytest.mark.faults
def test_a_submission_without_the_token_is_refused(cluster: LocalCluster) -> None:
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    for headers in ({}, {"Authorization": f"Bearer {secrets.token_hex(32)}"}):  # none, or a wrong one
        with pytest.raises(AuthenticationError, match=r"Authentication (required|failed)") as refused:
            JobSubmissionClient(cluster.address, headers=headers).submit_job(
                entrypoint="touch /tmp/ltrp-pwned"
            )
        print(f"submitted without the token: refused: {str(refused.value).splitlines()[0]}")
    assert not os.path.exists("/tmp/ltrp-pwned")


@pytest.mark.faults
def test_submitted_scoring_job_loses_its_node_and_writes_the_fault_free_table(
    scored: tuple[str, str, str], mlflow_uri: str
) -> None:
    out, logs, mae = scored
    assert "scored 64 images (128 rows)" in logs and "0 errors" in logs
    table = pq.read_table(f"{out}/scores")  # from the moto server, through AWS_ENDPOINT_URL_S3
    assert table.num_rows == 128 and len(set(table.column("image_id").to_pylist())) == 64
    assert {len(v) for v in table.column("visible").to_pylist()} == {16}  # 64 patches, 3/4 masked
    assert s3fs.S3FileSystem(skip_instance_cache=True).exists(f"{out}/_SUCCESS")

    # No row lost, none twice, each as a run that lost nothing writes it.
    order = [("image_id", "ascending"), ("view", "ascending")]
    got, expected = (t.sort_by(order) for t in (ltrp.read_scores(out), _fault_free_table(mae)))
    for column in ("image_id", "uri", "label", "view", "crop_box", "flip", "visible"):
        assert got.column(column).to_pylist() == expected.column(column).to_pylist(), column
    np.testing.assert_allclose(  # the batches differ (rows per scoring call): so may the last bits
        np.array(got.column("scores").to_pylist()), np.array(expected.column("scores").to_pylist()), rtol=1e-5
    )

    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("ltrp-score").experiment_id],
        filter_string=f"tags.output_uri = '{out}'",
    )
    assert run.data.metrics["images_scored"] == 64 and run.data.params["mae"] == "s3://cluster/mae.pth"


@pytest.mark.faults
def test_submitted_training_survives_losing_the_worker_node_checkpoints_to_s3_and_registers(
    scored: tuple[str, str, str], cluster: LocalCluster, settings: dict[str, str], mlflow_uri: str
) -> None:
    from ray.job_submission import JobStatus

    out, _, _ = scored
    job = Submitted(
        cluster.address,
        f"jobs.train --scores {out} --storage s3://cluster/train --name run1 --ranker ltrp_vit_micro_patch8"
        " --epochs 2 --warmup-epochs 0 --batch-size 16 --worker-cpus 0.5 --model models:/ltrp-cluster"
        " --alias candidate --cache-mib 0",  # streamed every epoch: the second lasts long enough to lose
        settings,
    )

    # Ray Train's record of the run, not the checkpoint's folder, which appears before its upload ends.
    job.wait_for(lambda: trainer.latest_checkpoint("s3://cluster/train", "run1") is not None, "a checkpoint")
    cluster.replace_worker()  # with both training workers
    assert job.status() == JobStatus.RUNNING  # the node was lost mid-training
    logs = job.finish()
    assert "trained ltrp_vit_micro_patch8 for 2 epochs (this run started at epoch 1)" in logs  # resumed
    assert "registered ltrp-cluster version 1 as @candidate" in logs
    client = MlflowClient(mlflow_uri)
    version = client.get_model_version_by_alias("ltrp-cluster", "candidate")
    assert version.tags["score_table"] == out and len(version.tags["mae_sha256"]) == 64
    steps = [m.step for m in client.get_metric_history(version.run_id, "train_loss")]
    assert sorted(steps) == [0, 1]  # epoch 0 logged before the loss, epoch 1 after it: each once
