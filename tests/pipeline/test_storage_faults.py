"""Transient storage faults: the S3 server behind a proxy that answers a share of the requests with 503
SlowDown, 500 InternalError or a dropped connection. The storage calls of the jobs' drivers (listing,
the lease, the job record, shard commits, reading the table back) retry them; the scoring job ends with
exactly the table of a fault-free run."""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow.compute as pc
import pytest
import s3fs
import torch
from conftest import fashion_mnist_pngs
from faulty_s3 import FaultyS3

import ltrp
from ltrp.data.tables import read_scores
from ltrp.pipeline import score_job
from ltrp.pipeline.configs import ScoreConfig
from ltrp.pipeline.lease import Lease

pytestmark = pytest.mark.slow
RATE = 0.2  # a fifth of all requests fail: far more than a store under load, so that every kind is hit


@pytest.fixture
def faulty(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultyS3]:
    """This process's S3 clients talk to the proxy (Ray's workers, started earlier, still to moto)."""
    proxy = FaultyS3(s3_endpoint, RATE, seed=0)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)
    s3fs.S3FileSystem.clear_instance_cache()  # cached clients hold the old endpoint
    yield proxy
    proxy.shutdown()
    s3fs.S3FileSystem.clear_instance_cache()
    print(f"proxy: {proxy.forwarded} requests forwarded, faults injected: {dict(proxy.injected)}")


def _table(out: str):
    columns = ["image_id", "view", "crop_box", "flip", "visible", "scores"]
    return read_scores(out, columns=columns).sort_by([("image_id", "ascending"), ("view", "ascending")])


def test_the_lease_holds_through_faults(s3_bucket: str, faulty: FaultyS3) -> None:
    for i in range(10):  # each claim: a conditional create, reads, a release
        with Lease(f"{s3_bucket}/out{i}", "jobs.score"):
            pass
    assert sum(faulty.injected.values()) > 0


def test_scoring_through_faults_writes_the_fault_free_table(
    s3_bucket: str, ray_address: str, tmp_path, request: pytest.FixtureRequest
) -> None:
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.pipe({f"{s3_bucket[5:]}/images/{name}": png for name, png in fashion_mnist_pngs(48).items()})
    torch.manual_seed(0)
    mae = tmp_path / "tiny.pth"
    ltrp.save_mae(ltrp.MAE(ltrp.GEOMETRIES["mae_vit_tiny_patch8"]), str(mae))

    def config(out: str) -> ScoreConfig:
        return ScoreConfig(source=f"{s3_bucket}/images", mae=str(mae), output=out, views=2, shard_size=4)

    clean = score_job.score_corpus(config(f"{s3_bucket}/clean"))
    proxy = request.getfixturevalue("faulty")
    faults = score_job.score_corpus(config(f"{s3_bucket}/faults"))
    assert sum(proxy.injected.values()) >= 10  # every kind of fault, many times
    assert (faults.images_scored, faults.rows_written, faults.errors) == (48, 96, 0)
    assert (clean.images_scored, clean.rows_written, clean.errors) == (48, 96, 0)
    expected, got = _table(f"{s3_bucket}/clean"), _table(f"{s3_bucket}/faults")
    assert got.num_rows == 96 and got.equals(expected)
    assert pc.count_distinct(got.column("image_id")).as_py() == 48
