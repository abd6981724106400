"""Shared fixtures: small real models, and real servers started and stopped by process id."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import ltrp
from ltrp.data.datasets import read_fashion_mnist
from ltrp.data.images import png_bytes

BIN = Path(sys.executable).parent  # console scripts of the test environment (moto_server, ...)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early with code {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


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
def s3_endpoint() -> Iterator[str]:
    """A real S3-compatible server (moto) on 127.0.0.1, with the environment pointing at it, so that
    boto3, s3fs and pyarrow all use it. Stopped by its process id at the end of the session."""
    port = free_port()
    proc = subprocess.Popen(
        [BIN / "moto_server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        wait_for_port(port, proc)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real MLflow tracking server with a SQLite registry on 127.0.0.1, stopped by process group."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [
            BIN / "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{root}/mlflow.db",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for_port(port, proc, timeout=60)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)


def fashion_mnist(count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` test images (count, 28, 28) uint8 and labels, from Debian's package."""
    try:
        images, labels = read_fashion_mnist("test")
    except FileNotFoundError as err:
        pytest.fail(f"{err} (.ci/run installs it)")
    return images[:count], labels[:count]


def fashion_mnist_pngs(count: int) -> dict[str, bytes]:
    """The first `count` test images as PNGs in ImageFolder layout: {"LABEL/IIII.png": bytes}."""
    images, labels = fashion_mnist(count)
    return {f"{y}/{i:04d}.png": png_bytes(x) for i, (x, y) in enumerate(zip(images, labels, strict=True))}


@pytest.fixture
def tiny_mae() -> ltrp.MAE:
    torch.manual_seed(0)
    return ltrp.MAE(ltrp.GEOMETRIES["mae_vit_tiny_patch8"]).eval()
