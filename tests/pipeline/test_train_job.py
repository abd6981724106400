"""The training job end to end, on real parts: a score table made by the scoring job on a moto S3
server, Ray Train DDP on a local Ray cluster, checkpoints on S3, a real MLflow server and registry."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import s3fs
import torch
from conftest import fashion_mnist_pngs
from mlflow.tracking import MlflowClient

import ltrp
from jobs.train import main as train_main
from ltrp.core.ranker import Ranker, rank
from ltrp.pipeline import score_job
from ltrp.pipeline.configs import ScoreConfig

ROOT = Path(__file__).resolve().parents[2]
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


def _run(args: list[str], env: dict, cwd: Path = ROOT) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc.stdout


def test_two_worker_ddp_checkpoints_to_s3_logs_and_registers(
    score_table: str, ray_address: str, mlflow_uri: str, tmp_path: Path
) -> None:
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir("train-ckpt")
    env = {**os.environ, "RAY_ADDRESS": ray_address, "MLFLOW_TRACKING_URI": mlflow_uri}
    stdout = _run(
        _train_args(
            score_table,
            "s3://train-ckpt",
            "ddp",
            2,
            "--workers",
            "2",
            "--alias",
            "candidate",
            "--model",
            "models:/ltrp-test",
        ),
        env,
    )
    assert "registered ltrp-test version 1 as @candidate" in stdout

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    assert any("checkpoint" in p for p in fs.ls("train-ckpt/ddp"))

    client = MlflowClient(mlflow_uri)
    version = client.get_model_version_by_alias("ltrp-test", "candidate")
    assert version.tags["score_table"] == score_table and len(version.tags["mae_sha256"]) == 64
    assert -1 <= float(version.tags["val_kendall_tau"]) <= 1
    history = client.get_metric_history(version.run_id, "train_loss")
    assert [m.step for m in history] == [0, 1]

    mlflow.set_tracking_uri(mlflow_uri)
    signature = mlflow.models.get_model_info("models:/ltrp-test@candidate").signature
    assert tuple(signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, 3, 64, 64)
    by_alias = mlflow.pytorch.load_model("models:/ltrp-test@candidate")
    by_version = mlflow.pytorch.load_model("models:/ltrp-test/1")
    assert isinstance(by_alias, Ranker)
    images = torch.randn(2, 3, 64, 64)
    scores = rank(by_alias, images)
    assert scores.shape == (2, 64) and torch.equal(scores, rank(by_version, images))
    pyfunc = mlflow.pyfunc.load_model("models:/ltrp-test@candidate")
    assert np.asarray(pyfunc.predict(images.numpy())).shape == (2, 64)


def test_a_killed_worker_is_replaced_and_a_rerun_resumes(
    score_table: str, ray_address: str, tmp_path: Path
) -> None:
    import psutil

    env = {**os.environ, "RAY_ADDRESS": ray_address, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"}
    args = _train_args(score_table, str(tmp_path / "ckpt"), "fault", 3)
    proc = subprocess.Popen(
        args,
        cwd=tmp_path,  # MLflow's SQLite store keeps artifacts in ./mlruns: not in the repository
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    # Two checkpoints on disk: the first is surely registered by Ray Train (the newest may be uploading).
    while len(list((tmp_path / "ckpt" / "fault").glob("checkpoint*"))) < 2:
        assert proc.poll() is None, proc.stderr.read()[-5000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    # Ray titles a train worker's process "ray::RayTrainWorker..."; this job has exactly one.
    (worker,) = [
        p
        for p in psutil.process_iter(["cmdline"])
        if "ray::RayTrainWorker" in " ".join(p.info["cmdline"] or [])
    ]
    os.kill(worker.pid, signal.SIGKILL)  # the worker process dies mid-training
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-5000:]
    started = int(stdout.split("this run started at epoch ")[1].split(")")[0])
    assert started in (1, 2)  # the replacement resumed from a checkpoint (the newest may still be uploading)

    again = _run(_train_args(score_table, str(tmp_path / "ckpt"), "fault", 4), env, cwd=tmp_path)
    assert "this run started at epoch 3" in again  # same name: resumed after the 3 finished epochs

    # One training, one MLflow run: the restart and the re-launch logged into the run it started in.
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("ltrp-train").experiment_id])
    first, second = (client.get_model_version("ltrp-ranker", v) for v in ("1", "2"))
    assert first.run_id == second.run_id == run.info.run_id
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert set(steps) == {0, 1, 2, 3}  # (an epoch the restarted workers did again is logged twice)
    assert run.data.params["epochs"] == "3" and run.data.tags["relaunched_with.epochs"] == "4"


def test_a_missing_table_or_another_patch_grid_is_refused_up_front(
    score_table: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    missing = str(tmp_path / "no-scores")
    for args, problem in (
        (["--scores", missing], f"--scores {missing}: no _ltrp_job.json there"),
        (["--scores", score_table], "--ranker ltrp_vit_small_patch16 has a 14x14 patch grid"),
    ):
        with pytest.raises(SystemExit) as exit_:
            train_main([*args, "--storage", str(tmp_path / "ckpt")])
        assert exit_.value.code == 2 and problem in capsys.readouterr().err
    assert not (tmp_path / "ckpt").exists()  # nothing started, nothing written
