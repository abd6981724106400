"""Stages (ltrp/pipeline/stages.py): what a model stage's pool and threads follow, and what a worker
loads to run the stages of a real job."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cloudpickle
import pytest
import torch
from support import fashion_mnist_pngs

import ltrp
from ltrp.pipeline.configs import ScoreConfig
from ltrp.pipeline.score_job import ScoreJob
from ltrp.pipeline.stages import Pool, Stage, cpu_threads, model_pool

POOLS = [
    (None, None, 0, (1, 1)),
    (2, None, 0, (2, 2)),
    (2, 5, 0, (2, 5)),
    (3, 2, 0, (3, 3)),
    (None, None, 4, (4, 4)),
]


@pytest.mark.parametrize(("workers", "max_workers", "gpus", "sizes"), POOLS)
def test_the_pool_grows_from_its_size_up_to_the_maximum(
    workers: int | None, max_workers: int | None, gpus: int, sizes: tuple[int, int]
) -> None:
    assert model_pool(workers, max_workers, gpus) == Pool(*sizes)


@pytest.mark.parametrize(("cpus", "threads", "expected"), [(0.5, None, 1), (3.0, None, 3), (3.0, 2, 2)])
def test_a_cpu_actors_threads_follow_the_cpus_it_reserves(
    cpus: float, threads: int | None, expected: int
) -> None:
    assert cpu_threads(False, cpus, threads) == expected
    assert cpu_threads(True, cpus, threads) is None  # a GPU actor's threads are Ray's default


def test_a_class_needs_a_pool_and_a_function_none() -> None:
    with pytest.raises(ValueError, match="stage ShardScorer: a class runs in an actor pool"):
        Stage(ltrp.pipeline.score_stages.ShardScorer, batch_size=1)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="stage len: a class runs in an actor pool"):
        Stage(len, batch_size=1, pool=Pool(1, 1))


def test_each_worker_loads_only_what_its_stage_needs(tmp_path: Path) -> None:
    """Each stage of the scoring job, pickled alone as Ray ships it and unpickled in a fresh interpreter,
    as a worker that runs only it: none loads MLflow, a driver-side job module or a launcher, nor what
    only the evaluation uses (scikit-image, scipy, matplotlib); the decode stage loads no timm or
    torchvision (the MAE's, ~2.4 CPU-s at every worker's start), the commit stage not even torch (~2
    CPU-s); the scoring actor's class loads the MAE's modules only when an actor is built
    (jobs.bench.feed measured worker starts as the largest CPU cost after decoding)."""
    (tmp_path / "images").mkdir()
    for name, png in list(fashion_mnist_pngs(2).items()):
        (tmp_path / "images" / Path(name).name).write_bytes(png)
    torch.manual_seed(0)
    ltrp.save_mae(ltrp.MAE(ltrp.GEOMETRIES["mae_vit_tiny_patch8"]), str(tmp_path / "mae.pth"))
    cfg = ScoreConfig(
        source=str(tmp_path / "images"), mae=str(tmp_path / "mae.pth"), output=str(tmp_path / "out")
    )
    code = (
        "import pickle, sys; pickle.loads(open(sys.argv[1], 'rb').read()); "
        "print(' '.join(sorted(m for m in sys.modules if m in ('torch', 'timm', 'torchvision') "
        "or m.split('.')[0] in ('mlflow', 'jobs', 'skimage', 'matplotlib', 'scipy') or m.endswith('_job'))))"
    )
    loaded = {}
    for stage in ScoreJob(cfg).stages("token", gpu=False):
        (tmp_path / "stage.pkl").write_bytes(cloudpickle.dumps((stage.fn, stage.kwargs)))
        run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "stage.pkl")], capture_output=True,
                             text=True, check=True)  # fmt: skip
        loaded[stage.name] = run.stdout.split()
    assert loaded == {"decode_shards": ["torch"], "ShardScorer": ["torch"], "commit_shards": []}
