"""The training job end to end, on real parts: a score table made by the scoring job on a moto S3
server, Ray Train DDP on a local Ray cluster, checkpoints on S3, a real MLflow server and registry."""

import json
import os
import posixpath
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
import s3fs
import torch
from conftest import fashion_mnist_pngs
from mlflow.tracking import MlflowClient

import ltrp
from jobs.train import main as train_main
from ltrp.core.ranker import rank
from ltrp.data.tables import JOB_FILE
from ltrp.pipeline import score_job, trainer
from ltrp.pipeline.configs import ScoreConfig
from ltrp.pipeline.registry import load_ranker_ref

ROOT = Path(__file__).resolve().parents[2]
CKPT_BUCKET = "train-ckpt"  # the training's checkpoints, on the moto S3 server
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def score_table(s3_endpoint: str, ray_address: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The scoring job's output on S3: 64 Fashion-MNIST images, 2 views each, a tiny MAE."""
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("train-data")
    fs.pipe({f"train-data/images/{name}": png for name, png in fashion_mnist_pngs(64).items()})
    torch.manual_seed(0)
    mae = tmp_path_factory.mktemp("mae") / "tiny.pth"
    ltrp.save_mae(ltrp.MAE(ltrp.GEOMETRIES["mae_vit_tiny_patch8"]), str(mae))
    out = "s3://train-data/scores"
    score_job.score_corpus(
        ScoreConfig(
            source="s3://train-data/images", mae=str(mae), output=out, views=2, mask_ratio=0.75, shard_size=32
        )
    )
    return out


def _train_args(scores: str, storage: str, name: str, epochs: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "jobs.train",
        "--scores",
        scores,
        "--storage",
        storage,
        "--name",
        name,
        "--ranker",
        "ltrp_vit_micro_patch8",
        "--epochs",
        str(epochs),
        "--batch-size",
        "16",
        *extra,
    ]


@contextmanager
def _launched(args: list[str], env: dict, logs: Path) -> Iterator[subprocess.Popen]:
    """A training job running in the background, its stdout and stderr in files under `logs` (a pipe
    that nobody reads while the test waits would fill with Ray's forwarded logs and stall the job's
    printing); killed, with its process group, if it still runs when the block ends (a failed test)."""
    with (logs / "stdout").open("w") as out, (logs / "stderr").open("w") as err:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=err, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _finish(proc: subprocess.Popen, logs: Path) -> str:
    """The stdout of a launched job, which must succeed."""
    proc.wait(timeout=600)
    assert proc.returncode == 0, (logs / "stderr").read_text()[-5000:]
    return (logs / "stdout").read_text()


def _checkpoints(fs: s3fs.S3FileSystem, path: str) -> list[str]:
    """The checkpoint folders under `path` on S3 (not Ray Train's checkpoint_manager_snapshot.json)."""
    try:
        entries = fs.ls(path, detail=True, refresh=True)
    except FileNotFoundError:  # nothing written yet
        return []
    return [
        e["name"]
        for e in entries
        if e["type"] == "directory" and posixpath.basename(e["name"]).startswith("checkpoint")
    ]


def _wait_until_resumable(
    fs: s3fs.S3FileSystem, storage: str, name: str, epochs: int, proc: subprocess.Popen, logs: Path
) -> None:
    """Until a restart of the running job would resume after `epochs` epochs: its `epochs`-th checkpoint
    is on S3 and in Ray Train's own record of the run (`trainer.latest_checkpoint`; a folder on S3 may
    still be uploading, and is not resumed from until Ray Train has registered it). 5 minutes at most."""
    deadline = time.monotonic() + 300
    while True:
        folders = sorted(_checkpoints(fs, storage.removeprefix("s3://") + "/" + name))
        if len(folders) >= epochs:
            resume = trainer.latest_checkpoint(storage, name)
            if resume and posixpath.basename(resume.path) == posixpath.basename(folders[epochs - 1]):
                return
        assert proc.poll() is None, (logs / "stderr").read_text()[-5000:]
        assert time.monotonic() < deadline, f"checkpoint {epochs} not registered after 300 s"
        time.sleep(0.2)


def _kill_one_train_worker() -> None:
    """SIGKILLs one of the job's two Ray Train workers: Ray titles their processes "ray::RayTrainWorker"."""
    # The session's Ray cluster was started by this process: its workers are among its descendants
    # (and another Ray on the machine, e.g. a concurrent test session, is left alone).
    workers = [p for p in psutil.Process().children(recursive=True) if "ray::RayTrainWorker" in _title(p)]
    assert len(workers) == 2, [_title(w) for w in workers]
    os.kill(workers[0].pid, signal.SIGKILL)  # a DDP worker dies mid-training


def _title(process: psutil.Process) -> str:
    """A process's command line, as Ray's titles show there ("" for one that is gone)."""
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


def _started_at(stdout: str) -> int:
    """The epoch a launch started at, as the job prints it."""
    return int(stdout.split("this run started at epoch ")[1].split(")")[0])


def _check_version_1(client: MlflowClient, mlflow_uri: str, score_table: str) -> None:
    """Version 1 of ltrp-test (@candidate): tagged with its inputs, its run's losses logged each epoch,
    loadable by alias and by version as the same ranker, and as a pyfunc."""
    version = client.get_model_version_by_alias("ltrp-test", "candidate")
    assert version.version == "1"
    assert version.tags["score_table"] == score_table
    assert re.fullmatch(r"[0-9a-f]{64}", version.tags["mae_sha256"])
    assert -1 <= float(version.tags["val_kendall_tau"]) <= 1
    steps = {m.step for m in client.get_metric_history(version.run_id, "train_loss")}
    assert steps == {0, 1}  # (a set: an epoch that a restart does again is logged twice)

    mlflow.set_tracking_uri(mlflow_uri)
    signature = mlflow.models.get_model_info("models:/ltrp-test@candidate").signature
    assert tuple(signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, 3, 64, 64)
    by_alias, _ = load_ranker_ref("models:/ltrp-test@candidate")
    by_version, _ = load_ranker_ref("models:/ltrp-test/1")
    images = torch.randn(2, 3, 64, 64)
    scores = rank(by_alias, images)
    assert scores.shape == (2, 64) and torch.equal(scores, rank(by_version, images))
    pyfunc = mlflow.pyfunc.load_model("models:/ltrp-test@candidate")
    assert np.asarray(pyfunc.predict(images.numpy())).shape == (2, 64)


def test_ddp_training_survives_a_killed_worker_registers_and_a_relaunch_resumes(
    score_table: str, job_in_process: Path, ray_address: str, mlflow_uri: str, capsys: pytest.CaptureFixture
) -> None:
    """Two DDP workers train 2 epochs with checkpoints on S3; one of them is killed in the second, Ray
    Train restarts the group from the last checkpoint, and the job still registers version 1 as
    @candidate, tagged and loadable. A re-launch with 3 epochs resumes after epoch 2 and registers
    version 2 in the same MLflow run. One test, not one per property: each Ray Train launch costs ~25 s."""
    tmp_path = job_in_process
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir(CKPT_BUCKET)
    env = {**os.environ, "RAY_ADDRESS": ray_address, "MLFLOW_TRACKING_URI": mlflow_uri}
    extra = ("--workers", "2", "--model", "models:/ltrp-test", "--alias", "candidate")
    storage, name = f"s3://{CKPT_BUCKET}", "ddp"

    with _launched(_train_args(score_table, storage, name, 2, *extra), env, tmp_path) as proc:
        _wait_until_resumable(fs, storage, name, 1, proc, tmp_path)
        _kill_one_train_worker()  # during the second epoch
        stdout = _finish(proc, tmp_path)
    assert _started_at(stdout) == 1  # the new worker group resumed from the last checkpoint
    assert "registered ltrp-test version 1 as @candidate" in stdout
    assert len(_checkpoints(fs, f"{CKPT_BUCKET}/{name}")) >= 2

    client = MlflowClient(mlflow_uri)
    _check_version_1(client, mlflow_uri, score_table)

    train_main(_train_args(score_table, storage, name, 3, *extra)[3:])  # the re-launch, in this process
    again = capsys.readouterr().out
    assert "this run started at epoch 2" in again  # same name: resumed after the 2 finished epochs
    assert "registered ltrp-test version 2 as @candidate" in again

    # One training, one MLflow run: the restart and the re-launch logged into the run it started in.
    # (Other tests train in ltrp-train on this server too: this training's runs carry its name.)
    experiment = client.get_experiment_by_name("ltrp-train").experiment_id
    (run,) = client.search_runs([experiment], filter_string=f"tags.ray_train_run = '{name}'")
    first, second = (client.get_model_version("ltrp-test", v) for v in ("1", "2"))
    assert first.run_id == second.run_id == run.info.run_id
    assert {m.step for m in client.get_metric_history(run.info.run_id, "train_loss")} == {0, 1, 2}
    assert run.data.params["epochs"] == "2" and run.data.tags["relaunched_with.epochs"] == "3"


def test_a_missing_table_or_another_patch_grid_is_refused_up_front(
    score_table: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    missing = str(tmp_path / "no-scores")
    # A table whose file lacks a column: read as the schema says, it would give nulls in its place.
    broken = tmp_path / "broken"
    (broken / "scores").mkdir(parents=True)
    (broken / JOB_FILE).write_text(json.dumps(ltrp.read_job_metadata(score_table)))
    pq.write_table(
        ltrp.read_scores(score_table).drop_columns(["scores"]), broken / "scores" / "part-00000.parquet"
    )
    micro = ["--ranker", "ltrp_vit_micro_patch8"]
    for args, problem in (
        (["--scores", missing], f"--scores {missing}: no _ltrp_job.json there"),
        (["--scores", score_table], "--ranker ltrp_vit_small_patch16 has a 14x14 patch grid"),
        (["--scores", str(broken), *micro], f"{broken}/scores/part-00000.parquet has no column scores"),
    ):
        with pytest.raises(SystemExit) as exit_:
            train_main([*args, "--storage", str(tmp_path / "ckpt")])
        assert exit_.value.code == 2 and problem in capsys.readouterr().err
    assert not (tmp_path / "ckpt").exists()  # nothing started, nothing written

    # A name already used for a training of another table: resuming would train (and register) its
    # weights as if they had learned from this one.
    (tmp_path / "used" / "run1").mkdir(parents=True)
    (tmp_path / "used" / "run1" / trainer.INPUTS_FILE).write_text(json.dumps({"scores": "s3://other/scores"}))
    args = ["--scores", score_table, "--storage", str(tmp_path / "used"), "--name", "run1"]
    with pytest.raises(SystemExit) as exit_:
        train_main([*args, *micro])
    assert (
        exit_.value.code == 2 and "holds a training of other inputs (differs in: " in capsys.readouterr().err
    )
