"""The training job end to end, on real parts: a score table made by the scoring job's stages on a moto S3
server, Ray Train DDP on a local Ray cluster, checkpoints on S3, a real MLflow server and registry."""

import json
import posixpath
import re
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import s3fs
import torch
from mlflow.tracking import MlflowClient
from support import fashion_mnist_pngs, score_in_process

import ltrp
from jobs.train import main as train_main
from ltrp.core.ranker import rank
from ltrp.data.checkpoints import weights_sha256
from ltrp.data.images import png_bytes
from ltrp.data.tables import JOB_FILE
from ltrp.pipeline import trainer
from ltrp.pipeline.configs import ScoreConfig
from ltrp.pipeline.registry import load_ranker_ref

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
    score_in_process(
        ScoreConfig(
            source="s3://train-data/images", mae=str(mae), output=out, views=2, mask_ratio=0.75, shard_size=32
        )
    )
    return out


def _train_args(scores: str, storage: str, name: str, epochs: int, *extra: str) -> list[str]:
    return [
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


def _checkpoints(fs: s3fs.S3FileSystem, path: str) -> list[str]:
    """The checkpoint folders under `path` on S3 (not Ray Train's checkpoint_manager_snapshot.json)."""
    entries = fs.ls(path, detail=True, refresh=True)
    return [
        e["name"]
        for e in entries
        if e["type"] == "directory" and posixpath.basename(e["name"]).startswith("checkpoint")
    ]


def _started_at(stdout: str) -> int:
    """The epoch a launch started at, as the job prints it."""
    return int(stdout.split("this run started at epoch ")[1].split(")")[0])


def _check_version_1(client: MlflowClient, mlflow_uri: str, score_table: str) -> None:
    """Version 1 of ltrp-test (@candidate): tagged with its inputs, its run's loss logged for its epoch,
    loadable by alias and by version as the same ranker, and as a pyfunc."""
    version = client.get_model_version_by_alias("ltrp-test", "candidate")
    assert version.version == "1"
    assert version.tags["score_table"] == score_table
    assert re.fullmatch(r"[0-9a-f]{64}", version.tags["mae_sha256"])
    assert -1 <= float(version.tags["val_kendall_tau"]) <= 1
    assert [m.step for m in client.get_metric_history(version.run_id, "train_loss")] == [0]

    mlflow.set_tracking_uri(mlflow_uri)
    signature = mlflow.models.get_model_info("models:/ltrp-test@candidate").signature
    assert signature.inputs.input_names() == ["image", "uri"]
    by_alias, _ = load_ranker_ref("models:/ltrp-test@candidate")
    by_version, _ = load_ranker_ref("models:/ltrp-test/1")
    assert by_alias.cfg.set_size == 16  # the table's n (mask ratio 0.75 of 64): it ranks in such sets
    images = torch.randn(2, 3, 64, 64)
    scores = rank(by_alias, images)
    assert scores.shape == (2, 64) and torch.equal(scores, rank(by_version, images))
    pyfunc = mlflow.pyfunc.load_model("models:/ltrp-test@candidate")
    frame = pd.DataFrame({"image": [png_bytes(np.zeros((64, 64, 3), np.uint8))] * 2})
    assert [len(s) for s in pyfunc.predict(frame)["scores"]] == [64, 64]
    run = client.get_run(version.run_id)
    (table,) = [i.dataset for i in run.inputs.dataset_inputs]  # lineage: what it learned from
    assert table.name == "score table" and re.fullmatch(r"[0-9a-f]{16}", table.digest)


@pytest.mark.faults  # 5 minutes of relaunches: with the other re-runs, so that make test stays under 12
def test_ddp_training_registers_and_a_relaunch_resumes(
    score_table: str, job_in_process: Path, mlflow_uri: str, capsys: pytest.CaptureFixture
) -> None:
    """Two DDP workers train 1 epoch from the table's MAE encoder with a checkpoint on S3 and register
    version 1 as @candidate, tagged and loadable. A re-launch with 2 epochs resumes after epoch 1 and
    registers version 2 in the same MLflow run. A third, validating every 2 epochs at a learning rate
    too small to move a weight, stops after its first validation (--patience 1) and registers the best
    epoch's weights again. One test, not one per property: each Ray Train launch costs ~25 s. (Workers
    lost mid-training, the group restarted from the last checkpoint: test_cluster.py loses a node.)"""
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir(CKPT_BUCKET)
    extra = ("--workers", "2", "--register", "models:/ltrp-test", "--alias", "candidate", "--init", "mae")
    extra += ("--keep-checkpoints", "3")  # each launch's checkpoints are counted below
    storage, name = f"s3://{CKPT_BUCKET}", "ddp"

    train_main(_train_args(score_table, storage, name, 1, *extra))
    stdout = capsys.readouterr().out
    assert _started_at(stdout) == 0 and "registered ltrp-test version 1 as @candidate" in stdout
    assert len(_checkpoints(fs, f"{CKPT_BUCKET}/{name}")) == 1

    client = MlflowClient(mlflow_uri)
    _check_version_1(client, mlflow_uri, score_table)

    train_main(_train_args(score_table, storage, name, 2, *extra))  # the re-launch
    again = capsys.readouterr().out
    assert _started_at(again) == 1  # same name: resumed after the finished epoch
    assert "registered ltrp-test version 2 as @candidate" in again
    assert len(_checkpoints(fs, f"{CKPT_BUCKET}/{name}")) == 2

    # One training, one MLflow run: the re-launch logged into the run it started in.
    # (Other tests train in ltrp-train on this server too: this training's runs carry its name.)
    experiment = client.get_experiment_by_name("ltrp-train").experiment_id
    (run,) = client.search_runs([experiment], filter_string=f"tags.ray_train_run = '{name}'")
    first, second = (client.get_model_version("ltrp-test", v) for v in ("1", "2"))
    assert first.run_id == second.run_id == run.info.run_id
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [0, 1]
    assert run.data.params["epochs"] == "1" and run.data.tags["relaunched_with.epochs"] == "2"

    still = ("--validate-every", "2", "--patience", "1", "--lr", "1e-30")
    train_main(_train_args(score_table, storage, name, 6, *extra, *still))
    stopped = capsys.readouterr().out
    assert _started_at(stopped) == 2 and "stopped early" in stopped
    assert "registered ltrp-test version 3 as @candidate" in stopped
    assert len(_checkpoints(fs, f"{CKPT_BUCKET}/{name}")) == 3  # epoch 3's: epoch 2 is not validated
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_kendall_tau")] == [0, 1, 3]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [0, 1, 2, 3]
    third = client.get_model_version("ltrp-test", "3")
    assert third.tags["epoch"] == second.tags["epoch"] in ("0", "1")  # the best of epochs 0 and 1
    ranker_2, _ = load_ranker_ref("models:/ltrp-test/2")
    ranker_3, _ = load_ranker_ref("models:/ltrp-test/3")
    assert weights_sha256(ranker_2) == weights_sha256(ranker_3)


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
