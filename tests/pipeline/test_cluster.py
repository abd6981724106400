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
import string
import time
from collections.abc import Callable, Iterator
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
import torch
import yaml
from mlflow.tracking import MlflowClient
from support import fashion_mnist_pngs
from test_cluster_files import ROOT, RUNTIME_ENV, SETTINGS

import ltrp
from ltrp import local
from ltrp.data.sources import plan_corpus
from ltrp.pipeline import runtime, score_stages, trainer
from ltrp.pipeline.configs import ScoreConfig
from ltrp.pipeline.shards import decode_shards, stage_schema

TOKEN = secrets.token_hex(32)  # this cluster's token: its nodes have it, and so does an allowed submitter
AUTH = {"Authorization": f"Bearer {TOKEN}"}  # what `ray job submit` sends with RAY_AUTH_TOKEN set


def _node_env() -> dict[str, str]:
    """The environment of the Ray nodes: none of the settings, so that a job only has them if they
    travelled in its runtime env, as on a real cluster; token authentication on, as cluster/ sets it
    (RAY_AUTH_TOKEN here; the launcher mounts the token file, KubeRay takes it from a Secret)."""
    env = local.ray_node_env(token=TOKEN, drop=SETTINGS)
    env[runtime.PARQUET_FOOTER_READERS] = "4"  # as many as the worker node's CPUs, not Ray Data's 32
    return env


#: The head's own settings: a lost node declared dead after ~3 s of failed health checks, not Ray's
#: default ~15 s.
HEAD_ENV = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}


class LocalCluster(local.RayCluster):
    """A two-node Ray cluster on 127.0.0.1 (`ltrp.local.RayCluster`): a head (GCS, dashboard and job
    server) with no CPUs, as cluster/ starts it, so every task and actor of a job runs on the worker
    node, which can be lost and replaced mid-job as a cloud machine can."""

    def __init__(self) -> None:
        # 4 logical CPUs on the machine's 2 cores keep Ray Data's read tasks from waiting on the actors.
        super().__init__(
            1,
            head_cpus=0,
            worker_cpus=4,
            env=_node_env(),
            head_env=HEAD_ENV,
            dashboard=True,
            temp_prefix="ltrp-ray-",
        )
        self.address = self.dashboard_url  # the Jobs API
        try:
            self.wait_for_nodes(2)
        except BaseException:
            self.stop()
            raise

    def alive_nodes(self) -> list:
        from ray.util.state import StateApiClient
        from ray.util.state.common import ListApiOptions, StateResource

        nodes = StateApiClient(self.address, headers=AUTH).list(
            StateResource.NODES, ListApiOptions(), raise_on_missing_output=False
        )
        return [n for n in nodes if n.state == "ALIVE"]

    def wait_for_nodes(self, count: int, timeout: float = 180) -> None:
        """Until exactly `count` nodes are alive (a killed node counts until the GCS declares it dead).
        Starting the two nodes took 72 s on a CI run beside the other fault tests, and over 90 s once."""
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
        self.kill_worker(self.workers[0])
        self.wait_for_nodes(1)
        self.add_worker()
        self.wait_for_nodes(2)


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
    worker_cpus=0.5,
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
    command += f" --worker-cpus {SCORING.worker_cpus}"
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
        image_rows=partial(score_stages.image_rows, cfg=cfg, size=64, grid=8),
        schema=stage_schema(*score_stages.COLUMNS),
    )
    return score_stages.ShardScorer(cfg, ltrp.load_mae(mae).checkpoint.sha256, gpu=False)(decoded)


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
    assert run.data.metrics["images"] == 64 and run.data.params["mae"] == "s3://cluster/mae.pth"


@pytest.mark.faults
def test_submitted_training_survives_losing_the_worker_node_checkpoints_to_s3_and_registers(
    scored: tuple[str, str, str], cluster: LocalCluster, settings: dict[str, str], mlflow_uri: str
) -> None:
    from ray.job_submission import JobStatus

    out, _, _ = scored
    job = Submitted(
        cluster.address,
        f"jobs.train --scores {out} --storage s3://cluster/train --name run1 --ranker ltrp_vit_micro_patch8"
        " --epochs 2 --warmup-epochs 0 --batch-size 16 --worker-cpus 0.5 --register models:/ltrp-cluster"
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
