"""Shared fixtures: small real models, and real servers started and stopped by process id."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from fault_proxy import FaultProxy

import ltrp
from ltrp.core.ranker import RankerConfig
from ltrp.data.datasets import read_fashion_mnist
from ltrp.data.images import center_crop, center_view, displayed_size, png_bytes, to_model_input
from ltrp.data.sources import Shard, plan_corpus, read_shard
from ltrp.data.tables import SCORES_SCHEMA
from ltrp.evaluation.measures import KEEP_RATIOS, Estimate, metric_key, vs_random
from ltrp.pipeline import runtime, score_job
from ltrp.pipeline.configs import ScoreConfig
from ltrp.pipeline.shards import FileGroups, commit_all, commit_shards, decode_shards

BIN = Path(sys.executable).parent  # console scripts of the test environment (moto_server, ...)
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
def s3_proxy() -> Iterator[FaultProxy]:
    """A real S3-compatible server (moto) on 127.0.0.1 behind the fault-injecting proxy, with the
    environment pointing at the proxy, so that boto3, s3fs and pyarrow, here and in every Ray worker and
    node started later, all use it. Faults are off unless a test turns them on (`proxy.faults(rate)`).
    moto is stopped by its process id at the end of the session."""
    port = free_port()
    proc = subprocess.Popen(
        [BIN / "moto_server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    names = ("AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    names += ("AWS_MAX_ATTEMPTS",)
    saved = {k: os.environ.get(k) for k in names}
    proxy = None
    try:
        wait_for_port(port, proc)
        proxy = FaultProxy(f"http://127.0.0.1:{port}")
        # Dummy credentials. 10 attempts per request, as for any store this flaky: the fault tests fail
        # a fifth of all requests, and at botocore's default of 5 attempts one request in ~12,000 would
        # fail every one of them with a 500 (which s3fs does not retry again): a few percent of runs.
        values = (proxy.endpoint, "testing", "testing", "us-east-1", "10")
        os.environ.update(zip(names, values, strict=True))
        yield proxy
    finally:
        if proxy is not None:
            proxy.shutdown()
        proc.terminate()
        proc.wait(timeout=10)
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


# Promotion: evaluations as a model version's eval.* tags hold them.
PRIMARY = "reconstruction_error.keep25"


def evaluation(recon: float = 0.040, acc: float = 0.80, width: float = 0.002, **overrides: float) -> dict:
    """Every key the default policy needs without masks: reconstruction_error (lower is better) and
    accuracy (higher) at every keep ratio, and the floor's ranker-minus-random difference on the primary,
    mean +/- `width`; `overrides` set single keys' means, e.g. accuracy_keep50=0.7."""
    means = {metric_key("reconstruction_error", r): recon for r in KEEP_RATIOS}
    means |= {metric_key("accuracy", r): acc for r in KEEP_RATIOS}
    means |= {k.replace("_keep", ".keep"): v for k, v in overrides.items()}
    # The floor: the ranker minus random on the primary, clearly below 0 (lower error is better).
    means[vs_random(PRIMARY)] = -0.01
    return {k: Estimate(m, m - width, m + width) for k, m in means.items()}


# Evaluation inputs: labelled folders and score tables as the scoring job writes them.
# A 32 px MAE and ranker on the 8x8 grid of "mae_vit_fmnist_patch4", small enough for tests.
SMALL_MAE = ltrp.MAEConfig(
    img_size=32,
    patch_size=4,
    embed_dim=32,
    depth=1,
    num_heads=2,
    decoder_embed_dim=32,
    decoder_depth=1,
    decoder_num_heads=2,
)
SMALL_RANKER = RankerConfig(img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2)


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray, first: int = 0) -> Path:
    """Images as PNGs in ImageFolder layout: root/LABEL/NNNN.png, numbered from `first`."""
    for i, (x, y) in enumerate(zip(images, labels, strict=True)):
        path = root / str(y) / f"{first + i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png_bytes(x))
    return root


def score_rows(source: Path, mae: ltrp.MAE, mask_ratio: float = 0.75) -> list[dict]:
    """Score-table rows for a folder's central squares, as the scoring job writes them."""
    items = [img for shard in plan_corpus(str(source), 1 << 20).shards for img in read_shard(shard)]
    pixels = np.stack([center_crop(img.data, mae.cfg.img_size) for img in items])
    visible = ltrp.visible_sets([img.image_id for img in items], grid=mae.cfg.grid, mask_ratio=mask_ratio)
    with torch.inference_mode():
        scores = ltrp.loo_scores(mae, to_model_input(pixels), visible)
    return [
        {
            "image_id": img.image_id,
            "uri": img.uri,
            "label": img.label,
            "view": 0,
            "crop_box": list(center_view(*displayed_size(img.data)).box),
            "flip": False,
            "visible": vis.tolist(),
            "scores": sc.tolist(),
        }
        for img, vis, sc in zip(items, visible, scores, strict=True)
    ]


def score_in_process(cfg: ScoreConfig) -> None:
    """The scoring job's table, by its own stages called as plain functions in this process: what
    `score_job.score_corpus(cfg)` writes, without starting Ray Data's workers (~50 s here), for tests
    that only need a table (the job itself: test_score_job.py)."""
    job = score_job.plan(cfg)
    out = job.out
    scorer = score_job.ShardScorer(cfg, job.metadata["mae_sha256"], gpu=False)
    image_rows = partial(score_job.image_rows, cfg=cfg, size=job.mae.cfg.img_size, grid=job.mae.cfg.grid)

    def manifests(pending: list[Shard], lease_token: str) -> Iterator[dict]:
        for shard in pending:
            batch = {"shard": np.array([shard.to_json()], dtype=object)}
            scored = scorer(decode_shards(batch, image_rows, score_job.STAGE_SCHEMA))
            yield from commit_shards(scored, out, job.metadata, lease_token).to_pylist()

    commit_all(out, "tests", job.metadata, job.corpus.shards, manifests, progress=lambda _: None)


def write_table(root: Path, rows: list[dict]) -> Path:
    """A score table as the scoring job lays it out: root/_ltrp_job.json, root/scores/part-00000.parquet."""
    (root / "scores").mkdir(parents=True, exist_ok=True)
    (root / "_ltrp_job.json").write_text(json.dumps({"fingerprint": []}))
    pq.write_table(pa.Table.from_pylist(rows, schema=SCORES_SCHEMA), root / "scores" / "part-00000.parquet")
    return root


def committed_shards(out: Path, table: str, groups: FileGroups) -> set[int]:
    """The shards a scoring or ranking job's local output holds, read from its files: the members of
    each combined group's file, and the shards under `_shards/` waiting for their group."""
    combined = {i for p in (out / table).glob("part-*.parquet") for i in groups.members(int(p.stem[5:]))}
    return combined | {int(p.stem) for p in out.glob(f"_shards/*/{table}/*.parquet")}


def committed_files(out: Path, table: str) -> dict[Path, pa.Table]:
    """The committed rows of a local job output, by file: combined groups' and waiting shards'."""
    paths = [*(out / table).glob("part-*.parquet"), *out.glob(f"_shards/*/{table}/*.parquet")]
    return {p: pq.read_table(p) for p in paths}


def holds_rows(table: pa.Table, rows: pa.Table) -> bool:
    """Whether every row of `rows` is a row of `table`, values and all."""
    held = table.to_pylist()
    return all(row in held for row in rows.to_pylist())
