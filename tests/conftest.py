"""Shared fixtures and hooks: small real models, and real servers (`ltrp.local`) started and stopped by
process id. The helpers tests call themselves are in support.py (`from support import ...`)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fault_proxy import FaultProxy

import ltrp
from ltrp import local
from ltrp.pipeline import runtime

#: Test files that run Ray Train (DDP workers, a second Ray cluster): each alone takes both of CI's
#: cores for minutes, and two of them side by side in the two xdist workers took twice as long each.
#: `make test` runs them one after the other in one worker while the other worker takes the rest.
#: (The storage-fault test trains too, beside the group. The pipeline test out of the group, to even
#: the two workers' loads, made the suite slower: 23:29 against 21:04, the trainings beside each other;
#: again with the fault runs out of `make test`: 12:34 against 11:51.)
RAY_TRAIN_FILES = ("test_train_job.py", "test_cluster.py", "test_pretrain_job.py", "test_workflow.py")


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """Load by file (`--dist loadfile`), except that the Ray Train files are one unit of work."""
    from xdist.scheduler import LoadFileScheduling

    class RayTrainFilesTogether(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = super()._split_scope(nodeid)
            return "ray-train" if file.rsplit("/", 1)[-1] in RAY_TRAIN_FILES else file

    return RayTrainFilesTogether(config, log)


@pytest.fixture(autouse=True)
def _restore_mlflow_tracking_uri() -> Iterator[None]:
    """`mlflow.set_tracking_uri` also writes MLFLOW_TRACKING_URI into os.environ: without this, one
    test's server would become the next test's subprocesses' default."""
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if saved is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = saved


@pytest.fixture(scope="session")
def s3_proxy() -> Iterator[FaultProxy]:
    """A real S3-compatible server (moto) on 127.0.0.1 behind the fault-injecting proxy, with the
    environment pointing at the proxy, so that boto3, s3fs and pyarrow, here and in every Ray worker and
    node started later, all use it. Faults are off unless a test turns them on (`proxy.faults(rate)`).
    moto is stopped by its process id at the end of the session."""
    moto = local.start_moto_server()
    names = ("AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    names += ("AWS_MAX_ATTEMPTS",)
    saved = {k: os.environ.get(k) for k in names}
    proxy = None
    try:
        proxy = FaultProxy(moto.url)
        # Dummy credentials. 10 attempts per request, as for any store this flaky: the fault tests fail
        # a fifth of all requests, and at botocore's default of 5 attempts one request in ~12,000 would
        # fail every one of them with a 500 (which s3fs does not retry again): a few percent of runs.
        values = (proxy.endpoint, "testing", "testing", "us-east-1", "10")
        os.environ.update(zip(names, values, strict=True))
        yield proxy
    finally:
        if proxy is not None:
            proxy.shutdown()
        local.stop_moto_server(moto)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def s3_endpoint(s3_proxy: FaultProxy) -> str:
    """The S3 endpoint every client here uses: http://127.0.0.1:PORT."""
    return s3_proxy.endpoint


@pytest.fixture
def s3_bucket(s3_endpoint: str, request: pytest.FixtureRequest) -> str:
    """A fresh, empty bucket on the moto server: s3://NAME."""
    import s3fs

    name = "t-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40]
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir(name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_address(s3_endpoint: str) -> Iterator[str]:
    """A real local Ray cluster for the session (after the S3 settings, so its workers inherit them),
    with more logical CPUs than this 2-core machine has: decode tasks and scoring actors each hold one,
    and Ray's own bookkeeping must never wait behind them. Jobs in subprocesses join it via RAY_ADDRESS."""
    import ray

    # Its processes inherit this environment: as a Ray the jobs start themselves, at most as many
    # Parquet footer readers per read as CPUs (`runtime.local_resources`), not Ray Data's 32.
    with pytest.MonkeyPatch.context() as env:
        env.setenv(runtime.PARQUET_FOOTER_READERS, "4")
        # address="local": a cluster of its own, even where someone's `ray start` cluster runs on this
        # machine (a plain ray.init() would try to join that one, and refuse num_cpus).
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        try:
            yield ray.get_runtime_context().gcs_address
        finally:
            ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real MLflow tracking server with a SQLite registry on 127.0.0.1, stopped by process group."""
    with local.mlflow_server(tmp_path_factory.mktemp("mlflow")) as server:
        yield server.url


@pytest.fixture
def job_in_process(
    tmp_path: Path, ray_address: str, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """For calling a launcher's main in this process, on the session's Ray cluster (a new interpreter
    per job run would only add its imports): MLflow at the session's server, and the working folder a
    fresh one, so that whatever a job writes by default lands there. Returns that folder."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def tiny_mae() -> ltrp.MAE:
    torch.manual_seed(0)
    return ltrp.MAE(ltrp.GEOMETRIES["mae_vit_tiny_patch8"]).eval()


@pytest.fixture(scope="module")
def mae_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny MAE ("mae_vit_tiny_patch8", seed 0) saved as a checkpoint, once per test module: its path."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("mae") / "tiny.pth"
    ltrp.save_mae(ltrp.MAE(ltrp.GEOMETRIES["mae_vit_tiny_patch8"]), str(path))
    return str(path)


@pytest.fixture(scope="module")
def mae(mae_path: str) -> ltrp.MAE:
    """The MAE of `mae_path`, loaded as a job loads it (with its checkpoint's sha256)."""
    return ltrp.load_mae(mae_path)
