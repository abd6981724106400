"""The corpus-job frame (ltrp/pipeline/corpus_job.py): a toy job built on it, its stages run in this
process and on Ray, and the kill-and-resume run of every corpus job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import ray.cloudpickle
import ray.data
import torch
from support import (
    committed_files,
    committed_shards,
    fashion_mnist,
    fashion_mnist_pngs,
    holds_rows,
    ray_data_workers,
    wait_for_exit,
)

import ltrp
from ltrp.core.ranker import RANKER_GEOMETRIES, Ranker
from ltrp.data.sources import SourceImage
from ltrp.data.tables import read_ranks, read_scores
from ltrp.pipeline.configs import CorpusConfig
from ltrp.pipeline.corpus_job import CorpusJob
from ltrp.pipeline.shards import VIEW_COLUMNS, FileGroups, usable_images, view_rows
from ltrp.pipeline.stages import Stage, run_in_process, run_on_ray

ROOT = Path(__file__).resolve().parents[2]
SIZE = 28
#: The mean-brightness job's rows: the view columns and one number.
BRIGHTNESS_SCHEMA = pa.schema([*VIEW_COLUMNS, pa.field("brightness", pa.float32())])


# -- a third corpus job, on the frame ------------------------------------------------------------------


@dataclass(kw_only=True)
class BrightnessConfig(CorpusConfig):
    """Each view's mean brightness: a corpus job with no model to load."""

    gain: float = 1.0


def brightness_rows(image: SourceImage, cfg: BrightnessConfig) -> list[dict]:
    return view_rows(image, range(cfg.views), cfg, SIZE)


def brightness(batch: pa.Table, gain: float) -> pa.Table:
    ok, images = usable_images(batch, SIZE, torch.device("cpu"))
    values: list[float | None] = [None] * batch.num_rows
    for i, value in zip(ok, images.mean(dim=(1, 2, 3)).mul(gain).tolist(), strict=True):
        values[i] = value
    return batch.drop_columns(["pixels"]).append_column("brightness", pa.array(values, pa.float32()))


class BrightnessJob(CorpusJob[BrightnessConfig]):
    name, verb, table, schema = "brightness", "measured", "brightness", BRIGHTNESS_SCHEMA

    def load(self) -> None:
        return None

    def model_keys(self) -> dict[str, Any]:
        return {}

    @property
    def size(self) -> int:
        return SIZE

    def image_rows(self) -> Any:
        return partial(brightness_rows, cfg=self.cfg)

    def model_stage(self, gpu: bool) -> Stage:
        return Stage(brightness, batch_size=self.cfg.batch_size, kwargs={"gain": self.cfg.gain}, cpus=0.5)


def _folder(root: Path, count: int) -> Path:
    for name, png in fashion_mnist_pngs(count).items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(png)
    (root / "broken.png").write_bytes(b"not an image")
    return root


def _brightness(out: Path) -> pa.Table:
    return pq.read_table(out / "brightness").sort_by([("image_id", "ascending"), ("view", "ascending")])


def test_a_toy_job_on_the_frame_writes_resumes_and_records_its_errors(tmp_path: Path) -> None:
    source = _folder(tmp_path / "images", 10)
    cfg = BrightnessConfig(source=str(source), output=str(tmp_path / "out"), views=2, shard_size=4, gain=2.0)
    summary = BrightnessJob(cfg).write(run_in_process, progress=lambda _: None)
    assert (summary.images, summary.rows_written, summary.errors, summary.shards) == (10, 20, 1, 3)
    assert summary.describe().startswith("measured 10 images (20 rows) and skipped 0 finished shards of 3")
    table = _brightness(tmp_path / "out")
    assert table.num_rows == 20 and pc.min(table.column("brightness")).as_py() < 0  # ImageNet-normalised
    out = tmp_path / "out"
    assert pq.read_table(out / "_errors").column("image_id").to_pylist() == ["broken.png"]
    # The root reads as the table: the errors, job files and staging folders are hidden by their "_".
    key = ["image_id", "view", "brightness"]
    for root_rows in (pq.read_table(out), pa.Table.from_pandas(pd.read_parquet(out))):
        assert (
            root_rows.select(key).sort_by([(k, "ascending") for k in key[:2]]).to_pylist()
            == table.select(key).to_pylist()
        )
    again = BrightnessJob(cfg).write(run_in_process, progress=lambda _: None)
    assert (again.shards_skipped, again.rows_written) == (3, 0)
    with pytest.raises(ValueError, match=r"differs in: gain\)"):  # the fingerprint holds the new field
        BrightnessJob(BrightnessConfig(**{**asdict(cfg), "gain": 1.0}))


@pytest.mark.slow
def test_the_stages_give_the_same_table_in_process_and_on_ray(tmp_path: Path, ray_address: str) -> None:
    source = _folder(tmp_path / "images", 12)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import a test module
    tables = {}
    for name, runner in (("in-process", run_in_process), ("ray", run_on_ray)):
        output = str(tmp_path / name)
        cfg = BrightnessConfig(source=str(source), output=output, views=2, shard_size=5, batch_size=3)
        BrightnessJob(cfg).write(runner, progress=lambda _: None)
        tables[name] = _brightness(tmp_path / name)
    assert tables["in-process"].num_rows == 24 and tables["in-process"].equals(tables["ray"])
    read_by_ray = ray.data.read_parquet(
        str(tmp_path / "ray")
    ).to_arrow_refs()  # the root, as Ray Data reads it
    rows = pa.concat_tables(ray.get(read_by_ray)).select(BRIGHTNESS_SCHEMA.names)
    assert rows.sort_by([("image_id", "ascending"), ("view", "ascending")]).equals(
        tables["ray"].select(BRIGHTNESS_SCHEMA.names)
    )


# -- every corpus job, killed and resumed ------------------------------------------------------------

#: The killed job's output files: 8 shards of 6 images, in groups of 3 shards per file.
GROUPS = FileGroups(size=3, shards=8)
#: Every corpus job: its launcher, its table's folder and reader.
JOBS = [("score", "scores", read_scores), ("rank", "ranks", read_ranks)]


def _model_option(job: str, tmp_path: Path) -> list[str]:
    """A model at 224 px, long enough a job to be killed part-way, cheap enough for CI."""
    torch.manual_seed(0)
    if job == "score":
        ltrp.save_mae(ltrp.MAE(ltrp.GEOMETRIES["mae_vit_demo_patch16"]), str(tmp_path / "demo.pth"))
        return ["--mae", str(tmp_path / "demo.pth")]
    ranker = Ranker(RANKER_GEOMETRIES["ltrp_vit_tiny_patch16"]).eval()
    torch.save({"model": ranker.state_dict(), "ranker_config": asdict(ranker.cfg)}, tmp_path / "state.pt")
    return ["--model", str(tmp_path / "state.pt")]


def _shards_so_far(out: Path, table: str) -> set[int]:
    """The shards a running job has committed; none where a group's combining removes a folder as the
    listing reaches it (the next poll sees the group's file)."""
    try:
        return committed_shards(out, table, GROUPS)
    except FileNotFoundError:
        return set()


@pytest.mark.faults
@pytest.mark.parametrize(("job", "table", "read"), JOBS)
def test_a_killed_job_resumes_without_duplicates_or_gaps(
    job: str,
    table: str,
    read: Any,
    tmp_path: Path,
    ray_address: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    _, labels = fashion_mnist(48)
    source = _folder(tmp_path / "images", 48)
    (source / "broken.png").unlink()
    out = tmp_path / "out"
    args = [
        *("--source", str(source), *_model_option(job, tmp_path), "--output", str(out), "--views", "2"),
        *("--shard-size", "6", "--file-shards", "3", "--batch-size", "12"),
    ]
    env = {**os.environ, "RAY_ADDRESS": ray_address, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"}
    other_jobs = ray_data_workers()
    proc = subprocess.Popen(
        [sys.executable, "-m", f"jobs.{job}", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while len(_shards_so_far(out, table)) < 3:
        assert proc.poll() is None, "the job ended before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    wait_for_exit(ray_data_workers() - other_jobs)  # the job's tasks commit until Ray kills them
    assert not (out / "_SUCCESS").exists()
    done, first = committed_shards(out, table, GROUPS), committed_files(out, table)
    assert 3 <= len(done) < 8

    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    monkeypatch.chdir(tmp_path)
    main = __import__(f"jobs.{job}", fromlist=["main"]).main
    main(args)  # the re-run, in this process
    assert f"skipped {len(done)} finished shards of 8" in capsys.readouterr().out
    # Finished shards were not redone: a combined group's file is as it was, a waiting shard's rows
    # are in its group's file now.
    final = committed_files(out, table)
    assert all(final[p].equals(rows) for p, rows in first.items() if p.parent == out / table)
    combined = pa.concat_tables(final.values())
    assert all(holds_rows(combined, rows) for p, rows in first.items() if p.parent != out / table)
    assert not (out / "_shards").exists()
    rows = read(str(out), columns=["image_id", "view"])
    keys = list(zip(rows.column("image_id").to_pylist(), rows.column("view").to_pylist(), strict=True))
    expected = {(f"{label}/{i:04d}.png", v) for i, label in enumerate(labels) for v in (0, 1)}
    assert len(keys) == len(set(keys)) and set(keys) == expected
    assert (out / "_SUCCESS").exists() and not list(out.rglob(".*.tmp"))
