"""Transient storage faults: S3 (for the tests, Ray's workers and Ray Train alike) and the MLflow server
behind proxies that answer a fifth of the requests with 503 SlowDown, 500 InternalError, a dropped
connection or a late answer. Every storage call the jobs make retries them: the scoring job and the
evaluation end with exactly the output of a fault-free run, and ranker training trains on every view
once, without a restart, and registers the weights of its checkpoint."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from urllib.parse import urlsplit

import pyarrow.compute as pc
import pytest
import s3fs
import torch
from fault_proxy import FAULTS, FaultProxy
from mlflow.tracking import MlflowClient
from support import fashion_mnist_pngs

import ltrp
from ltrp.data.tables import read_scores
from ltrp.pipeline import evaluate_job, train_job, trainer
from ltrp.pipeline.configs import EvaluateConfig, ScoreConfig, TrainConfig
from ltrp.pipeline.lease import Lease
from ltrp.pipeline.registry import load_ranker_ref
from ltrp.pipeline.score_job import ScoreJob

pytestmark = pytest.mark.slow
RATE = 0.2  # a fifth of all requests fail: far more than a store under load, so that every kind is hit
IMAGES = 48


@pytest.fixture(scope="module")
def corpus(s3_endpoint: str, ray_address: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """s3://BUCKET holding images/ (Fashion-MNIST PNGs by label), mae.pth (a tiny MAE) and clean/ (the
    images' central squares scored without faults)."""
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("faults")
    fs.pipe({f"faults/images/{name}": png for name, png in fashion_mnist_pngs(IMAGES).items()})
    torch.manual_seed(0)
    mae = tmp_path_factory.mktemp("mae") / "tiny.pth"
    ltrp.save_mae(ltrp.MAE(ltrp.GEOMETRIES["mae_vit_tiny_patch8"]), str(mae))
    fs.put_file(str(mae), "faults/mae.pth")
    ScoreJob(_score_config("s3://faults", "clean")).write()
    return "s3://faults"


@pytest.fixture
def faulty_mlflow(mlflow_uri: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    """The MLflow server behind a fault proxy (runs, registry and artifacts), this test's tracking URI."""
    proxy = FaultProxy(mlflow_uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", proxy.endpoint)
    # MLflow's client retries each request up to 7 times, waiting 2 s x 2^n (plus up to 1 s of jitter)
    # from the second retry on: with a fifth of requests failing, minutes of waiting in all. Without
    # the doubling it still retries, after the jitter alone; the retries are what is tested.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    yield proxy
    proxy.shutdown()


def _score_config(bucket: str, output: str) -> ScoreConfig:
    return ScoreConfig(
        source=f"{bucket}/images", mae=f"{bucket}/mae.pth", output=f"{bucket}/{output}", shard_size=4
    )


def _table(out: str):
    columns = ["image_id", "view", "crop_box", "flip", "visible", "scores"]
    return read_scores(out, columns=columns).sort_by([("image_id", "ascending"), ("view", "ascending")])


def test_the_lease_holds_through_faults(s3_bucket: str, s3_proxy: FaultProxy) -> None:
    with s3_proxy.faults(RATE) as proxy:
        for i in range(10):  # each claim: a conditional create, reads, a release
            with Lease(f"{s3_bucket}/out{i}", "jobs.score"):
                pass
    assert sum(proxy.injected.values()) > 0


def test_a_faulted_head_leaves_the_connection_readable(s3_bucket: str, s3_proxy: FaultProxy) -> None:
    """A HEAD's error answer has no body: the next bytes on the connection are the next answer (aiohttp,
    under s3fs, reads what follows a HEAD's headers as the next status line; http.client drops them)."""
    netloc = urlsplit(s3_proxy.endpoint).netloc
    host, port = netloc.split(":")
    head = f"HEAD /{s3_bucket[5:]} HTTP/1.1\r\nHost: {netloc}\r\n\r\n".encode()
    with s3_proxy.faults(1.0):
        answer = b""
        while not answer.startswith((b"HTTP/1.1 500", b"HTTP/1.1 503")):  # not dropped, nor forwarded
            connection = socket.create_connection((host, int(port)), timeout=10)
            connection.sendall(head)
            answer = connection.recv(65536)
    connection.sendall(head.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
    while part := connection.recv(65536):
        answer += part
    second = answer.split(b"\r\n\r\n", 1)[1]
    assert second.startswith(b"HTTP/1.1 ") and b"<Error>" not in second


@pytest.mark.faults  # 70 s with its corpus: make test took 12:28 of its 12 minutes on a clean clone
def test_scoring_through_faults_writes_the_fault_free_table(corpus: str, s3_proxy: FaultProxy) -> None:
    with s3_proxy.faults(RATE) as proxy:  # the driver's listing, lease and commits; the workers' reads
        faults = ScoreJob(_score_config(corpus, "scored-through-faults")).write()
    assert set(proxy.injected) == set(FAULTS) and sum(proxy.injected.values()) >= 20
    assert (faults.images, faults.rows_written, faults.errors) == (IMAGES, IMAGES, 0)
    expected, got = _table(f"{corpus}/clean"), _table(f"{corpus}/scored-through-faults")
    assert got.num_rows == IMAGES and got.equals(expected)
    assert pc.count_distinct(got.column("image_id")).as_py() == IMAGES


@pytest.mark.faults
def test_training_and_evaluation_through_faults(
    corpus: str, s3_proxy: FaultProxy, faulty_mlflow: FaultProxy, tmp_path
) -> None:
    name = "faults-ranker"
    cfg = TrainConfig(
        scores=f"{corpus}/clean",
        storage=f"{corpus}/train",
        name="run1",
        ranker="ltrp_vit_micro_patch8",
        epochs=1,
        warmup_epochs=0,
        batch_size=8,
        worker_cpus=0.5,
        register=f"models:/{name}",
    )
    _, train_views, _ = train_job.check_inputs(cfg)
    # Reading the table, Ray Train's checkpoints; MLflow's runs, metrics, registry and artifacts.
    with s3_proxy.faults(RATE) as s3, faulty_mlflow.faults(RATE, seed=1) as tracking:
        trained = train_job.run(cfg)
    assert sum(s3.injected.values()) >= 10 and sum(tracking.injected.values()) >= 10
    assert (trained.epochs, trained.start_epoch, trained.version) == (1, 0, "1")  # no restart
    client = MlflowClient(faulty_mlflow.endpoint)
    seen = [m.value for m in client.get_metric_history(trained.mlflow_run_id, "train_views")]
    assert seen == [train_views]  # every view, once
    checkpoint = train_job.load_ranker_checkpoint(trainer.latest_checkpoint(cfg.storage, cfg.name))
    with s3_proxy.faults(RATE), faulty_mlflow.faults(RATE, seed=2):
        registered, _ = load_ranker_ref(f"models:/{name}/1")  # checks the weights' digest
    for key, value in checkpoint.state_dict().items():
        assert torch.equal(registered.state_dict()[key], value), key

    def evaluate(output: str) -> dict:
        summary = evaluate_job.run(
            EvaluateConfig(
                model=f"models:/{name}/1",
                mae=f"{corpus}/mae.pth",
                scores=(f"{corpus}/clean",),
                train_source=f"{corpus}/images",
                test_source=f"{corpus}/images",
                output=f"{corpus}/{output}",
                max_train=IMAGES,
                classifier_dim=32,
                classifier_depth=1,
                classifier_epochs=1,
                resamples=50,
            ),
            progress=lambda _: None,
        )
        assert client.get_run(summary.run_id).info.status == "FINISHED"
        return json.loads(
            s3fs.S3FileSystem(skip_instance_cache=True).cat_file(f"{corpus[5:]}/{output}/estimates.json")
        )

    clean = evaluate("eval-clean")
    with s3_proxy.faults(RATE, seed=3), faulty_mlflow.faults(RATE, seed=4):
        assert evaluate("eval-through-faults") == clean
