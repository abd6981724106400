"""The ranking job: its stage as a plain function, then end to end on real parts (a local Ray cluster,
a moto S3 server, the MLflow registry, Fashion-MNIST), killed and resumed."""

from __future__ import annotations

from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pytest
import s3fs
import torch
from mlflow.tracking import MlflowClient
from support import fashion_mnist, fashion_mnist_pngs

import ltrp
from ltrp.core.options import ROUNDS
from ltrp.core.ranker import RANKER_GEOMETRIES, Ranker, keep_top
from ltrp.data.checkpoints import weights_sha256
from ltrp.data.images import View, render_view, to_model_input
from ltrp.data.sources import Shard, read_bytes
from ltrp.data.tables import RANKS_SCHEMA, read_errors, read_job_metadata, read_ranks, top_k
from ltrp.pipeline import rank_job
from ltrp.pipeline.configs import ConfigError, InputError, RankConfig
from ltrp.pipeline.rank_stages import ShardRanker, image_rows
from ltrp.pipeline.registry import register_ranker
from ltrp.pipeline.shards import decode_shards, stage_schema

ROOT = Path(__file__).resolve().parents[2]
GEOMETRY = "ltrp_vit_fmnist_patch4"  # 32 px, an 8 x 8 grid


def _ranker(geometry: str = GEOMETRY, seed: int = 0) -> Ranker:
    """As the training job builds it from a table scored at mask ratio 0.75: it ranks in sets of 16."""
    torch.manual_seed(seed)
    return Ranker(replace(RANKER_GEOMETRIES[geometry], set_size=16)).eval()


def _save(ranker: Ranker, path: Path) -> str:
    """A training checkpoint as jobs.train writes it (state.pt): weights and geometry."""
    torch.save({"model": ranker.state_dict(), "ranker_config": asdict(ranker.cfg)}, path)
    return str(path)


def _stage(ranker: Ranker, weights: dict | None = None) -> ShardRanker:
    """The ranking stage as the job builds it (weights and geometry, checked against the digest)."""
    config = asdict(ranker.cfg)
    return ShardRanker(config, weights or ranker.state_dict(), weights_sha256(ranker), ROUNDS, gpu=False)


def _replayed(rows: list[dict], size: int) -> torch.Tensor:
    """The stored views, rendered again from the source bytes and their geometry."""
    pixels = np.stack(
        [render_view(read_bytes(r["uri"]), View(tuple(r["crop_box"]), r["flip"]), size) for r in rows]
    )
    return to_model_input(pixels)


def test_the_ranking_stage_gives_the_library_rank_of_each_view(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    pngs = fashion_mnist_pngs(6)
    for i, png in enumerate(pngs.values()):
        (folder / f"{i}.png").write_bytes(png)
    (folder / "broken.png").write_bytes(b"not an image")
    names = [*(f"{i}.png" for i in range(6)), "broken.png"]
    shard = Shard(0, tuple(names), tuple(str(folder / n) for n in names), tuple("x" for _ in names))
    cfg = RankConfig(source=str(folder), model="unused", output=str(tmp_path / "out"), views=2, crop="random")
    ranker = _ranker()
    batch = {"shard": np.array([shard.to_json()], dtype=object)}
    decoded = decode_shards(batch, partial(image_rows, cfg=cfg, size=32), stage_schema())
    stage = _stage(ranker)
    out = pa.concat_tables([stage(decoded.slice(0, 5)), stage(decoded.slice(5))])  # batches split images
    rows = out.to_pylist()
    assert [r["error"] is not None for r in rows].count(True) == 1  # the broken file, passed through
    ranked = [r for r in rows if r["error"] is None]
    assert len(ranked) == 12 and {r["view"] for r in ranked} == {0, 1}
    _assert_ranked_as_the_library_ranks(ranked, ranker)


def _assert_ranked_as_the_library_ranks(rows: list[dict], ranker: Ranker) -> None:
    """Each row's scores are `ltrp.rank`'s on its view (to fp16), and its order sorts them, best first
    (up to the last bits, which differ with the batch a view was computed in)."""
    expected = ltrp.rank(ranker, _replayed(rows, ranker.cfg.img_size)).numpy()
    np.testing.assert_allclose(
        np.array([r["scores"] for r in rows], np.float32), expected, rtol=2e-3, atol=2e-3
    )
    in_order = np.take_along_axis(expected, np.array([r["order"] for r in rows]), axis=1)
    assert (np.diff(in_order, axis=1) <= 1e-5).all()
    assert all(sorted(r["order"]) == list(range(expected.shape[1])) for r in rows)


@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.25, 0.5, 1.0])
def test_top_k_from_the_table_is_keep_top_of_the_scores(ratio: float) -> None:
    scores = torch.randn(5, 196, generator=torch.Generator().manual_seed(0))
    order = scores.argsort(dim=1, descending=True).tolist()
    table = pa.table({"order": pa.array(order, pa.list_(pa.int16()))})
    np.testing.assert_array_equal(top_k(table, ratio), keep_top(scores, ratio).numpy())
    assert (ltrp.top_k, ltrp.read_ranks) == (top_k, read_ranks)  # the package's names for them


def test_a_ranker_whose_weights_changed_on_the_way_is_refused() -> None:
    ranker = _ranker()
    weights = {k: v.clone() for k, v in ranker.state_dict().items()}
    weights["head.bias"] += 1
    with pytest.raises(RuntimeError, match="arrived changed"):
        _stage(ranker, weights)


def test_weights_digest_names_the_function_not_the_file(tmp_path: Path) -> None:
    ranker = _ranker()
    assert weights_sha256(ltrp.load_ranker(_save(ranker, tmp_path / "a.pt"))) == weights_sha256(ranker)
    assert weights_sha256(_ranker(seed=1)) != weights_sha256(ranker)


@pytest.mark.parametrize(
    ("model", "problem"),
    [
        ("models:/ranker", "expected models:/NAME/VERSION"),
        ("models:/ranker@", "expected models:/NAME/VERSION"),
    ],
)
def test_a_model_reference_that_names_no_version_is_refused(model: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=rf"--model: {problem}"):
        RankConfig(source="x", model=model, output="y")


def test_bad_inputs_fail_before_any_work(
    tmp_path: Path, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(next(iter(fashion_mnist_pngs(1).values())))
    out = tmp_path / "out"
    for model, problem in [
        ("models:/no-such-ranker@champion", "not in the registry"),
        (str(tmp_path / "missing.pt"), "ranker checkpoint not found"),
    ]:
        with pytest.raises(InputError, match=problem):
            rank_job.run(RankConfig(source=str(tmp_path / "images"), model=model, output=str(out)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images"):
        rank_job.run(
            RankConfig(
                source=str(tmp_path / "empty"), model=_save(_ranker(), tmp_path / "r.pt"), output=str(out)
            )
        )
    assert not out.exists()


@pytest.mark.slow
def test_ranks_a_corpus_from_s3_with_the_registry_champion(
    s3_endpoint: str, job_in_process: Path, mlflow_uri: str, capsys: pytest.CaptureFixture
) -> None:
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("rank-corpus")
    fs.pipe({f"rank-corpus/{name}": png for name, png in fashion_mnist_pngs(60).items()})
    fs.pipe_file("rank-corpus/9/broken.png", b"not a png")
    ranker = _ranker()
    name = "rank-test-ranker"
    mlflow.set_tracking_uri(mlflow_uri)
    mlflow.set_experiment("ltrp-train-for-rank-test")
    with mlflow.start_run():
        version = register_ranker(ranker, name, tags={"source": "test"}, alias="champion")
    fs.mkdir("ranks")
    out = "s3://ranks/run1"
    from jobs.rank import main

    args = ["--source", "s3://rank-corpus/", "--model", f"models:/{name}@champion", "--output", out]
    main([*args, "--views", "2", "--crop", "random", "--flip", "--shard-size", "16", "--batch-size", "24"])
    stdout = capsys.readouterr().out
    assert "ranked 60 images (120 rows)" in stdout and "1 errors" in stdout and "committed shard" in stdout

    table = read_ranks(out)
    assert table.schema.remove_metadata() == RANKS_SCHEMA
    keys = list(zip(table.column("image_id").to_pylist(), table.column("view").to_pylist(), strict=True))
    _, labels = fashion_mnist(60)
    assert len(keys) == len(set(keys)) == 120
    assert {k for k, _ in keys} == {f"{label}/{i:04d}.png" for i, label in enumerate(labels)}
    assert read_errors(out).column("image_id").to_pylist() == ["9/broken.png"]
    meta = read_job_metadata(out)
    assert (meta["model_name"], str(meta["model_version"])) == (name, str(version.version))
    assert meta["model_sha256"] == weights_sha256(ranker) and meta["model_uri"] == f"models:/{name}@champion"

    rows = table.to_pylist()[::7]  # rankings equal the library's rank on the same views
    expected = ltrp.rank(ranker, _replayed(rows, 32))
    assert [r["order"] for r in rows] == expected.argsort(dim=1, descending=True, stable=True).tolist()
    np.testing.assert_array_equal(
        top_k(pa.Table.from_pylist(rows, RANKS_SCHEMA), 0.25), keep_top(expected, 0.25)
    )

    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("ltrp-rank").experiment_id], filter_string=f"tags.output_uri = '{out}'"
    )
    assert run.data.metrics["images"] == 60 and run.data.metrics["errors"] == 1
    assert run.data.tags["model_version"] == str(version.version) and run.data.tags["model_name"] == name

    main([*args, "--views", "2", "--crop", "random", "--flip", "--shard-size", "16"])  # again: all done
    assert "ranked 0 images (0 rows) and skipped 4 finished shards of 4" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # the same output with other settings: refused, naming them
        main([*args, "--views", "1", "--shard-size", "16", "--rounds", "0"])
    assert "differs in: crop, flip, rounds, views" in capsys.readouterr().err
