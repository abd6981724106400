"""The scoring job's stages as plain functions, without Ray: decoding, scoring, regrouping rows into
shards, the output folder and the job's fingerprint. The end-to-end runs on a Ray cluster are in
test_score_job.py."""

import dataclasses
import io
import json
import random
import shutil
import tarfile
from collections import Counter
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

import ltrp
from ltrp.data.images import View, png_bytes, render_view, to_model_input, view_geometry
from ltrp.data.sources import Shard, plan_corpus, plan_digest
from ltrp.data.tables import ERRORS_SCHEMA, SCORES_SCHEMA
from ltrp.pipeline.configs import ConfigError, InputError, ScoreConfig, identity_fields
from ltrp.pipeline.lease import Lease, LeaseHeld
from ltrp.pipeline.score_job import ScoreJob
from ltrp.pipeline.score_stages import COLUMNS, ShardScorer, image_rows
from ltrp.pipeline.shards import FileGroups, ShardedOutput, commit_shards, decode_shards, stage_schema

SIZE, GRID = 64, 8  # the tiny MAE's image size and patch grid
#: A file per shard, as far as the tests of one shard's commit are concerned (shards 0-3).
GROUPS = FileGroups(size=1, shards=4)
#: The fields of ScoreConfig that a resume may change: all others must be fingerprinted.
MAY_CHANGE = {*("mae", "output", "batch_size", "workers", "max_workers", "worker_cpus", "threads", "device")}
#: A different value for every identity field, each of which must make a resume refuse.
RESULT_CHANGES = {
    "source": "elsewhere",  # a copy of the corpus
    "views": 2,
    "cover": 1,
    "crop": "random",
    "flip": True,
    "mask_ratio": 0.5,
    "seed": 1,
    "mode": "encoder",
    "metric": "l2",
    "precision": "bf16",
    "shard_size": 1,
    "file_shards": 2,
    "min_side": 8,
    "max_pixels": 10**6,
}


def _image(seed: int, height: int, width: int, gray: bool = False) -> bytes:
    rng = np.random.default_rng(seed)
    shape = (height, width) if gray else (height, width, 3)
    return png_bytes(rng.integers(0, 256, shape, dtype=np.uint8))


def _shard(folder: Path, index: int, files: dict[str, bytes | None]) -> Shard:
    """A shard of the named files, written under `folder` (None: a file that does not exist)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        if data is not None:
            (folder / name).write_bytes(data)
    names = list(files)
    return Shard(index, tuple(names), tuple(str(folder / n) for n in names), tuple(f"L{n[0]}" for n in names))


def _cfg(tmp_path: Path, mae: str = "unused.pth", **changes: object) -> ScoreConfig:
    return ScoreConfig(**{"source": str(tmp_path), "mae": mae, "output": str(tmp_path / "out"), **changes})


def _decode(cfg: ScoreConfig, *shards: Shard) -> pa.Table:
    # As Ray's numpy batches hold it: one shard descriptor per row, as an object array of str.
    batch = {"shard": np.array([s.to_json() for s in shards], dtype=object)}
    return decode_shards(batch, partial(image_rows, cfg=cfg, size=SIZE, grid=GRID), stage_schema(*COLUMNS))


def score_output(uri: str, groups: FileGroups) -> ShardedOutput:
    return ShardedOutput(uri, "scores", SCORES_SCHEMA, groups)


def _pixels(row: dict) -> np.ndarray:
    return np.frombuffer(row["pixels"], np.uint8).reshape(SIZE, SIZE, 3)


@pytest.fixture(scope="module")
def mae_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("mae") / "tiny.pth"
    ltrp.save_mae(ltrp.MAE(ltrp.GEOMETRIES["mae_vit_tiny_patch8"]), str(path))
    return str(path)


@pytest.fixture(scope="module")
def mae(mae_path: str) -> ltrp.MAE:
    return ltrp.load_mae(mae_path)


# -- decode -----------------------------------------------------------------------------------------


def test_cover_mode_scores_every_patch_of_one_view_r_times(tmp_path: Path) -> None:
    files = {"a.png": _image(0, 40, 90), "b.png": _image(1, 64, 64)}
    cfg = _cfg(tmp_path, cover=2, crop="random", flip=True, mask_ratio=0.75, seed=5)
    rows = _decode(cfg, _shard(tmp_path, 0, files)).to_pylist()
    per_round = GRID * GRID // 16  # 64 patches in sets of 16
    assert len(rows) == len(files) * 2 * per_round
    for image_id in files:
        mine = [r for r in rows if r["image_id"] == image_id]
        assert [r["view"] for r in mine] == list(range(2 * per_round))  # a row per visible set
        assert len({(tuple(r["crop_box"]), r["flip"], r["pixels"]) for r in mine}) == 1  # all of view 0
        counts = Counter(p for r in mine for p in r["visible"])
        assert set(counts) == set(range(GRID * GRID)) and min(counts.values()) == 2
        expected = ltrp.core.masking.cover_sets(image_id, grid=GRID, mask_ratio=0.75, seed=5, rounds=2)
        assert [r["visible"] for r in mine] == expected.tolist()


def test_cover_with_several_views_is_refused() -> None:
    with pytest.raises(ConfigError, match="cover"):
        ScoreConfig(source="s", mae="m", output="o", cover=2, views=3)


@pytest.mark.parametrize(("views", "crop", "flip"), [(1, "center", False), (3, "random", True)])
def test_decode_gives_one_row_per_image_and_view(tmp_path: Path, views: int, crop: str, flip: bool) -> None:
    files = {"b.png": _image(0, 40, 90), "a.png": _image(1, 70, 30, gray=True)}
    shard = _shard(tmp_path, 0, files)
    cfg = _cfg(tmp_path, views=views, crop=crop, flip=flip, mask_ratio=0.75, seed=3)
    rows = _decode(cfg, shard).to_pylist()

    # In the shard's order, each image's views in order.
    assert [(r["image_id"], r["view"]) for r in rows] == [
        (i, v) for i in ("b.png", "a.png") for v in range(views)
    ]
    sizes = {"b.png": (90, 40), "a.png": (30, 70)}
    for row in rows:
        image_id, view, data = row["image_id"], row["view"], files[row["image_id"]]
        assert row["error"] is None
        assert row["uri"] == str(tmp_path / image_id) and row["label"] == f"L{image_id[0]}"
        assert len(row["pixels"]) == SIZE * SIZE * 3
        geometry = view_geometry(image_id, view, *sizes[image_id], seed=3, crop=crop, flip=flip)
        assert (tuple(row["crop_box"]), row["flip"]) == (geometry.box, geometry.flip)
        # The pixels are exactly the stored view replayed from the source bytes (what training does).
        np.testing.assert_array_equal(
            _pixels(row), render_view(data, View(tuple(row["crop_box"]), row["flip"]), SIZE)
        )
        expected = ltrp.visible_sets([image_id], grid=GRID, mask_ratio=0.75, seed=3, view=view)[0]
        assert row["visible"] == expected.tolist() and len(row["visible"]) == 16
    if views > 1:  # each view of an image has its own crop and visible set
        for image_id in files:
            mine = [r for r in rows if r["image_id"] == image_id]
            assert len({tuple(r["crop_box"]) for r in mine}) == views
            assert len({tuple(r["visible"]) for r in mine}) == views


def test_decoding_is_deterministic_and_follows_the_seed(tmp_path: Path) -> None:
    shard = _shard(tmp_path, 0, {"x.png": _image(0, 50, 80), "y.png": _image(1, 64, 64)})
    cfg = _cfg(tmp_path, views=2, crop="random", flip=True, mask_ratio=0.75)
    first, again = _decode(cfg, shard), _decode(cfg, shard)
    assert first.equals(again)
    other = _decode(dataclasses.replace(cfg, seed=1), shard)
    for column in ("crop_box", "visible", "pixels"):
        assert first.column(column).to_pylist() != other.column(column).to_pylist()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"certainly not a PNG", "cannot decode image"),
        (b"", "empty file"),
        (_image(2, 8, 40), "too small: 40x8"),
        (None, "cannot read file"),  # listed in the shard, gone from the disk
    ],
)
def test_an_unusable_image_becomes_one_error_row(tmp_path: Path, data: bytes | None, reason: str) -> None:
    shard = _shard(tmp_path, 5, {"good.png": _image(0, 32, 32), "bad.png": data})
    table = _decode(_cfg(tmp_path, views=2), shard)
    rows = {(r["image_id"], r["view"]): r for r in table.to_pylist()}
    assert set(rows) == {("good.png", 0), ("good.png", 1), ("bad.png", None)}
    bad = rows["bad.png", None]
    assert reason in bad["error"]
    assert (bad["uri"], bad["label"]) == (str(tmp_path / "bad.png"), "Lb")
    assert bad["pixels"] is None and bad["visible"] is None and bad["crop_box"] is None
    assert all(r["error"] is None for k, r in rows.items() if k[0] == "good.png")
    assert set(table.column("shard").to_pylist()) == {5}
    assert set(table.column("shard_rows").to_pylist()) == {3}


def _empty_tar(tmp_path: Path) -> Shard:
    """A tar shard whose only sample holds metadata, no image."""
    path = tmp_path / "meta-only.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("s0.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    return Shard(9, tar=str(path))


@pytest.mark.parametrize("kind", ["file list", "tar"])
def test_a_shard_without_images_still_yields_one_row(tmp_path: Path, kind: str) -> None:
    shard = Shard(9) if kind == "file list" else _empty_tar(tmp_path)
    (row,) = _decode(_cfg(tmp_path), shard).to_pylist()
    assert (row["shard"], row["shard_rows"]) == (9, 1)
    assert row["error"] == "shard holds no images"
    assert row["image_id"] == (shard.tar or "9") and row["pixels"] is None


def test_every_row_carries_its_shard_and_the_shards_row_count(tmp_path: Path) -> None:
    shards = [
        _shard(
            tmp_path / "s7", 7, {"a.png": _image(0, 30, 30), "b.png": b"junk", "c.png": _image(1, 40, 20)}
        ),
        Shard(2),  # no images: one row
        _shard(tmp_path / "s0", 0, {"d.png": _image(2, 20, 60)}),
    ]
    table = _decode(_cfg(tmp_path, views=2), *shards)
    counts = Counter(table.column("shard").to_pylist())
    assert counts == {7: 5, 2: 1, 0: 2}  # 2 views of 2 images + 1 error; 1; 2 views
    for row in table.to_pylist():
        assert row["shard_rows"] == counts[row["shard"]]
    assert table.column("shard").to_pylist() == [7] * 5 + [2] + [0] * 2  # shard by shard


# -- scoring ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "metric"), [("decoder", "l1"), ("encoder", "l2")])
def test_the_scorer_scores_usable_rows_as_loo_scores_does(
    tmp_path: Path, mae_path: str, mae: ltrp.MAE, mode: str, metric: str
) -> None:
    files = {"a.png": _image(0, 60, 90), "b.png": b"junk", "c.png": _image(1, 64, 64, gray=True)}
    cfg = _cfg(tmp_path, mae_path, views=2, crop="random", mask_ratio=0.9, mode=mode, metric=metric)
    batch = _decode(cfg, _shard(tmp_path, 0, files))
    scored = ShardScorer(cfg, mae.checkpoint.sha256, gpu=False)(batch)

    assert scored.column_names == [c for c in batch.column_names if c != "pixels"] + ["scores"]
    assert scored.drop_columns(["scores"]).equals(batch.drop_columns(["pixels"]))
    rows = batch.to_pylist()
    ok = [i for i, r in enumerate(rows) if r["error"] is None]
    assert len(ok) == 4 and len(rows) == 5
    scores = scored.column("scores").to_pylist()
    assert [scores[i] for i in range(len(rows)) if i not in ok] == [None]
    assert all(len(scores[i]) == len(rows[i]["visible"]) == 6 for i in ok)  # int(64 * 0.1)
    expected = ltrp.loo_scores(
        mae,
        to_model_input(np.stack([_pixels(rows[i]) for i in ok])),
        torch.tensor([rows[i]["visible"] for i in ok]),
        mode=mode,
        metric=metric,
    )
    got = np.array([scores[i] for i in ok], np.float32)
    assert np.all(got > 0)  # not an empty or zero result that would match anything
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-8)


def test_the_scorer_passes_a_batch_of_errors_through(tmp_path: Path, mae_path: str, mae: ltrp.MAE) -> None:
    cfg = _cfg(tmp_path, mae_path)
    scored = ShardScorer(cfg, mae.checkpoint.sha256, gpu=False)(_decode(cfg, Shard(3)))
    assert scored.column("scores").to_pylist() == [None]


def test_the_scorer_refuses_a_checkpoint_changed_since_the_job_started(tmp_path: Path) -> None:
    path = str(tmp_path / "mae.pth")
    torch.manual_seed(0)
    ltrp.save_mae(ltrp.MAE(ltrp.GEOMETRIES["mae_vit_tiny_patch8"]), path)
    sha256 = ltrp.load_mae(path).checkpoint.sha256
    cfg = _cfg(tmp_path, path)
    assert ShardScorer(cfg, sha256, gpu=False).mae.checkpoint.sha256 == sha256
    torch.manual_seed(1)
    ltrp.save_mae(ltrp.MAE(ltrp.GEOMETRIES["mae_vit_tiny_patch8"]), path)  # replaced under the job
    with pytest.raises(RuntimeError, match="changed since the job started"):
        ShardScorer(cfg, sha256, gpu=False)


# -- the output folder ------------------------------------------------------------------------------


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def scored(
    tmp_path_factory: pytest.TempPathFactory, mae_path: str, mae: ltrp.MAE
) -> tuple[dict, pa.Table, Path]:
    """(job metadata, a scored shard whose rows come unsorted with an unusable image among them, the
    folder of its images)."""
    images = tmp_path_factory.mktemp("images")
    files = {"b.png": _image(0, 40, 40), "z.png": b"junk", "a.png": _image(1, 50, 30)}
    cfg = _cfg(images, mae_path, views=2)
    shard = _shard(images, 3, files)
    table = ShardScorer(cfg, mae.checkpoint.sha256, gpu=False)(_decode(cfg, shard))
    table = table.take([3, 0, 4, 2, 1])  # a0, b0, a1, z, b1
    return _metadata(cfg), table, images


@pytest.fixture
def output(tmp_path: Path) -> str:
    return str(tmp_path / "out")


def test_claim_records_the_job_and_accepts_the_same_job_again(
    scored: tuple[dict, pa.Table, Path],
    output: str,
) -> None:
    metadata, _, _ = scored
    out = score_output(output + "/", GROUPS)
    assert out.check(metadata) is False
    assert not Path(output).exists()  # checking writes nothing
    out.claim(metadata)
    assert _files(Path(output)) == {"_ltrp_job.json"}
    assert json.loads((Path(output) / "_ltrp_job.json").read_text()) == metadata
    before = (Path(output) / "_ltrp_job.json").read_bytes()
    score_output(output, GROUPS).claim(json.loads(json.dumps(metadata)))  # another run of the same job
    assert score_output(output, GROUPS).check(metadata) is True
    assert (Path(output) / "_ltrp_job.json").read_bytes() == before


@pytest.mark.parametrize("key", ["seed", "mask_ratio", "plan_digest", "mae_sha256", "mae_config"])
def test_claiming_for_another_job_is_refused_naming_what_differs(
    scored: tuple[dict, pa.Table, Path], output: str, key: str
) -> None:
    metadata, _, _ = scored
    score_output(output, GROUPS).claim(metadata)
    before = (Path(output) / "_ltrp_job.json").read_bytes()
    other = {**metadata, key: "something else"}
    for attempt in (score_output(output, GROUPS).check, score_output(output, GROUPS).claim):
        with pytest.raises(ValueError, match=rf"differs in: {key}\)"):
            attempt(other)
    assert (Path(output) / "_ltrp_job.json").read_bytes() == before


def test_a_key_only_one_side_fingerprints_still_counts(
    scored: tuple[dict, pa.Table, Path], output: str
) -> None:
    metadata, _, _ = scored
    score_output(output, GROUPS).claim(
        {**metadata, "extra": 1, "fingerprint": [*metadata["fingerprint"], "extra"]}
    )
    with pytest.raises(ValueError, match="differs in: extra"):
        score_output(output, GROUPS).check(metadata)


def test_metadata_outside_the_fingerprint_may_differ(
    scored: tuple[dict, pa.Table, Path], output: str
) -> None:
    metadata, _, _ = scored
    score_output(output, GROUPS).claim(metadata)
    assert score_output(output, GROUPS).check({**metadata, "mae_uri": "moved.pth", "torch_version": "9.9"})


def test_commit_writes_errors_then_scores_sorted(
    scored: tuple[dict, pa.Table, Path], output: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    metadata, table, images = scored
    out = score_output(output, GROUPS)
    out.claim(metadata)
    written = []
    write = ShardedOutput._write

    def crash_on_second_write(self: ShardedOutput, path: str, data: pa.Table) -> None:
        written.append(str(Path(path).relative_to(Path(output))))
        if len(written) == 2:
            raise OSError("disk full")
        write(self, path, data)

    monkeypatch.setattr(ShardedOutput, "_write", crash_on_second_write)
    with pytest.raises(OSError, match="disk full"):
        out.commit(3, table, metadata)
    assert written == ["errors/part-00003.parquet", "scores/part-00003.parquet"]
    assert out.committed_shards() == set()  # a crash between the two files leaves the shard to redo
    monkeypatch.undo()

    scores, errors = out.commit(3, table, metadata)
    assert out.committed_shards() == {3}
    stored = pq.read_table(Path(output) / "scores" / "part-00003.parquet")
    assert stored.schema.remove_metadata() == SCORES_SCHEMA
    assert json.loads(stored.schema.metadata[b"ltrp"]) == metadata
    assert [(r["image_id"], r["view"]) for r in stored.to_pylist()] == [
        ("a.png", 0),
        ("a.png", 1),
        ("b.png", 0),
        ("b.png", 1),
    ]
    assert stored.equals(scores.cast(stored.schema))
    assert all(len(r["scores"]) == len(r["visible"]) for r in stored.to_pylist())
    failed = pq.read_table(Path(output) / "errors" / "part-00003.parquet")
    assert failed.schema.remove_metadata() == ERRORS_SCHEMA
    assert failed.equals(errors.cast(failed.schema))
    ((image_id, uri, reason),) = [tuple(r.values()) for r in failed.to_pylist()]
    assert (image_id, uri) == ("z.png", str(images / "z.png"))
    assert "cannot decode image" in reason


def test_finish_needs_every_shard_and_leaves_no_temporary_files(
    scored: tuple[dict, pa.Table, Path], output: str
) -> None:
    metadata, table, _ = scored
    out = score_output(output, GROUPS)
    out.claim(metadata)
    for index in (0, 2):
        out.commit(index, table, metadata)
    with pytest.raises(RuntimeError, match="1 of 3 shards are not committed"):
        out.finish(3)
    assert not (Path(output) / "_SUCCESS").exists()
    out.commit(1, table.filter(pc.is_valid(table.column("error"))), metadata)  # errors only
    assert out.committed_shards() == {0, 1, 2}
    assert pq.read_table(Path(output) / "scores" / "part-00001.parquet").num_rows == 0
    out.finish(3)
    files = _files(Path(output))
    assert files == {"_ltrp_job.json", "_SUCCESS"} | {
        f"{kind}/part-0000{i}.parquet" for kind in ("scores", "errors") for i in range(3)
    }
    assert not any(Path(f).name.startswith(".") for f in files)


# -- the commit stage: shards committed where the rows are ------------------------------------------


def _in_shard(table: pa.Table, index: int) -> pa.Table:
    return table.set_column(0, "shard", pa.array([index] * table.num_rows, pa.int32()))


def _stored(output: str, index: int) -> pa.Table:
    return pq.read_table(Path(output) / "scores" / f"part-{index:05d}.parquet")


@pytest.mark.parametrize("seed", range(4))
def test_shards_split_over_batches_in_any_order_are_committed_once_each_when_complete(
    scored: tuple[dict, pa.Table, Path], output: str, seed: int
) -> None:
    """Shards whose rows arrive in batches of several shards, in any order, as from several actors; a
    batch delivered twice (a retried task) and rows delivered again in another batch (a lost block
    recomputed) add nothing."""
    metadata, table, _ = scored
    rng = random.Random(seed)
    rows = [(index, i) for index in range(4) for i in range(table.num_rows)]
    rng.shuffle(rows)
    cuts = sorted(rng.sample(range(1, len(rows)), 5))
    batches = [
        pa.concat_tables([_in_shard(table.slice(i, 1), index) for index, i in rows[a:b]])
        for a, b in zip([0, *cuts], [*cuts, len(rows)], strict=True)
    ]
    batches.insert(rng.randrange(len(batches)), batches[rng.randrange(len(batches))])  # again, whole
    batches.insert(rng.randrange(len(batches)), _in_shard(table.slice(1, 3), rng.randrange(4)))  # again
    last = {index: k for k, batch in enumerate(batches) for index in batch.column("shard").to_pylist()}
    out = score_output(output, GROUPS)
    out.claim(metadata)
    committed = []
    with Lease(output, "test") as lease:
        for k, batch in enumerate(batches):
            for manifest in commit_shards(batch, out, metadata, lease.token).to_pylist():
                committed.append(manifest["shard"])
                assert k <= last[manifest["shard"]]  # as soon as complete (or at a repeat before that)
                assert (manifest["images"], manifest["rows"], manifest["errors"]) == (2, 4, 1)
    assert sorted(committed) == [0, 1, 2, 3]  # each once: the repeats came while it was incomplete
    reference = score_output(str(Path(output) / "reference"), GROUPS)
    for index in range(4):
        expected, _ = reference.commit(index, _in_shard(table, index), metadata)
        assert _stored(output, index).equals(expected.cast(_stored(output, index).schema))
    out.finish(4)  # also removes a part a repeat staged after its shard was committed
    assert not (Path(output) / "_parts").exists()


def test_a_shard_in_one_batch_is_committed_without_staging(
    scored: tuple[dict, pa.Table, Path], output: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    metadata, table, _ = scored
    out = score_output(output, GROUPS)
    out.claim(metadata)
    monkeypatch.setattr(ShardedOutput, "stage", lambda *a: pytest.fail("staged a complete shard"))
    with Lease(output, "test") as lease:
        (manifest,) = commit_shards(table, out, metadata, lease.token).to_pylist()
    assert manifest == {"shard": 3, "images": 2, "rows": 4, "errors": 1}
    assert out.committed_shards() == {3}


def test_a_commit_task_that_dies_after_staging_is_redone_without_duplicates(
    scored: tuple[dict, pa.Table, Path], output: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commit task is killed between staging the last part and committing the shard; Ray runs the
    same batch again."""
    metadata, table, _ = scored
    out = score_output(output, GROUPS)
    out.claim(metadata)
    commit = ShardedOutput.commit

    def killed(self: ShardedOutput, *args: object) -> None:
        raise SystemExit("killed")

    with Lease(output, "test") as lease:
        assert commit_shards(table.slice(0, 2), out, metadata, lease.token).num_rows == 0
        monkeypatch.setattr(ShardedOutput, "commit", killed)
        with pytest.raises(SystemExit):
            commit_shards(table.slice(2), out, metadata, lease.token)
        assert out.committed_shards() == set()
        monkeypatch.setattr(ShardedOutput, "commit", commit)
        (manifest,) = commit_shards(table.slice(2), out, metadata, lease.token).to_pylist()
    assert manifest["rows"] == 4
    assert sorted(r["image_id"] for r in _stored(output, 3).to_pylist()) == ["a.png"] * 2 + ["b.png"] * 2


def test_a_commit_for_a_job_that_lost_its_lease_is_refused(
    scored: tuple[dict, pa.Table, Path], output: str
) -> None:
    metadata, table, _ = scored
    out = score_output(output, GROUPS)
    out.claim(metadata)
    with (
        Lease(output, "jobs.score"),
        pytest.raises(LeaseHeld, match=r"lost its lease \(now held by jobs\.score"),
    ):
        commit_shards(table, out, metadata, "another job's token")
    assert out.committed_shards() == set()


# -- file groups: several shards per output file -----------------------------------------------------


@pytest.mark.parametrize(
    ("size", "shards", "groups"),
    [(1, 3, [[0], [1], [2]]), (2, 5, [[0, 1], [2, 3], [4]]), (4, 4, [[0, 1, 2, 3]]), (8, 3, [[0, 1, 2]])],
)
def test_file_groups_are_consecutive_shards(size: int, shards: int, groups: list[list[int]]) -> None:
    grouping = FileGroups(size, shards)
    assert [list(grouping.members(g)) for g in range(len(groups))] == groups
    assert [grouping.of(i) for i in range(shards)] == [g for g, m in enumerate(groups) for _ in m]


def _shard_of(table: pa.Table, index: int) -> pa.Table:
    """`table`'s rows as shard `index`'s, their images renamed so that every shard's rows differ."""
    ids = pc.binary_join_element_wise(pa.scalar(f"{index}/"), table.column("image_id"), "")
    return _in_shard(table, index).set_column(table.schema.get_field_index("image_id"), "image_id", ids)


def _keys(table: pa.Table) -> list[tuple[str, int]]:
    return list(zip(table.column("image_id").to_pylist(), table.column("view").to_pylist(), strict=True))


@pytest.mark.parametrize("seed", range(3))
def test_groups_are_combined_once_complete_and_the_table_never_shows_a_row_twice(
    scored: tuple[dict, pa.Table, Path], output: str, seed: int
) -> None:
    """Five shards in groups of two, committed in any order, one delivered twice: after every commit the
    table holds exactly the rows of the groups complete so far, each once, in shard order."""
    metadata, table, _ = scored
    groups = FileGroups(size=2, shards=5)
    order = random.Random(seed).sample(range(5), 5)
    order.insert(random.Random(seed).randrange(1, 5), order[0])  # Ray delivers a shard again
    out = score_output(output, groups)
    out.claim(metadata)
    reference = score_output(str(Path(output) / "reference"), FileGroups(size=1, shards=5))
    expected = {i: reference.commit(i, _shard_of(table, i), metadata) for i in range(5)}
    done: set[int] = set()
    with Lease(output, "test") as lease:
        for index in order:
            commit_shards(_shard_of(table, index), out, metadata, lease.token)
            done.add(index)
            assert out.committed_shards() == done
            complete = [g for g in range(3) if set(groups.members(g)) <= done]
            shown = [i for g in complete for i in groups.members(g)]
            assert _keys(ltrp.read_scores(output)) == [k for i in shown for k in _keys(expected[i][0])]
            assert ltrp.read_errors(output).num_rows == len(shown)  # z.png, once per shard
    for g in range(3):
        rows, errors = (
            pq.read_table(Path(output) / kind / f"part-{g:05d}.parquet") for kind in ("scores", "errors")
        )
        members = groups.members(g)
        assert rows.equals(pa.concat_tables([expected[i][0] for i in members]).cast(rows.schema))
        assert errors.equals(pa.concat_tables([expected[i][1] for i in members]).cast(errors.schema))
        assert json.loads(rows.schema.metadata[b"ltrp"]) == metadata
    out.finish(5)
    assert {f for f in _files(Path(output)) if not f.startswith("reference")} == {
        "_ltrp_job.json",
        "_SUCCESS",
        *(f"{kind}/part-0000{g}.parquet" for kind in ("scores", "errors") for g in range(3)),
    }


@pytest.mark.parametrize("crash", ["writing the group's rows", "removing its shards"])
def test_a_crash_while_combining_shows_no_row_twice_and_finish_completes_it(
    scored: tuple[dict, pa.Table, Path], output: str, crash: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    metadata, table, _ = scored
    groups = FileGroups(size=2, shards=2)
    out = score_output(output, groups)
    out.claim(metadata)
    write, remove = ShardedOutput._write, ShardedOutput._remove

    def crashing_write(self: ShardedOutput, path: str, data: pa.Table) -> None:
        if path.endswith("scores/part-00000.parquet"):
            raise SystemExit("killed")
        write(self, path, data)

    def crashing_remove(self: ShardedOutput, path: str) -> None:
        if "_shards" in path:
            raise SystemExit("killed")
        remove(self, path)

    with Lease(output, "test") as lease:
        commit_shards(_shard_of(table, 0), out, metadata, lease.token)
        if crash == "writing the group's rows":
            monkeypatch.setattr(ShardedOutput, "_write", crashing_write)
        else:
            monkeypatch.setattr(ShardedOutput, "_remove", crashing_remove)
        with pytest.raises(SystemExit):
            commit_shards(_shard_of(table, 1), out, metadata, lease.token)
    monkeypatch.undo()
    assert out.committed_shards() == {0, 1}  # a re-run does not redo them
    shown = ltrp.read_scores(output)
    assert len(set(_keys(shown))) == shown.num_rows == (8 if crash == "removing its shards" else 0)
    out.finish(2)
    assert _keys(ltrp.read_scores(output)) == [
        (f"{i}/{a}.png", v) for i in (0, 1) for a in "ab" for v in (0, 1)
    ]
    assert not (Path(output) / "_shards").exists()


def test_a_combine_that_finds_the_shards_gone_does_nothing(
    scored: tuple[dict, pa.Table, Path], output: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two commit tasks completed the group at once; the other one combined it and removed the shards
    while this one read them."""
    metadata, table, _ = scored
    out = score_output(output, FileGroups(size=2, shards=2))
    out.claim(metadata)
    for index in (0, 1):
        out.commit(index, _shard_of(table, index), metadata)

    def gone(self: ShardedOutput, path: str) -> pa.Table:
        raise FileNotFoundError(path)

    monkeypatch.setattr(ShardedOutput, "_read_shard", gone)
    out.combine(0)
    assert not (Path(output) / "scores").exists() and out.committed_shards() == {0, 1}
    monkeypatch.undo()
    out.combine(0)
    before = (Path(output) / "scores" / "part-00000.parquet").read_bytes()
    out.combine(0)  # late: the shards are gone, the file stays
    assert (Path(output) / "scores" / "part-00000.parquet").read_bytes() == before


# -- the job's fingerprint --------------------------------------------------------------------------


def _corpus(tmp_path: Path) -> Path:
    _shard(tmp_path / "corpus", 0, {"a.png": _image(0, 20, 20), "b.png": _image(1, 20, 20)})
    return tmp_path / "corpus"


def _metadata(cfg: ScoreConfig) -> dict:
    """The metadata a job of `cfg` records, planned on an output of its own."""
    return ScoreJob(dataclasses.replace(cfg, output=cfg.output + "-planned")).metadata


def _scores(cfg: ScoreConfig) -> ShardedOutput:
    return score_output(cfg.output, GROUPS)


def test_the_fingerprint_holds_every_identity_field_and_what_is_derived(
    tmp_path: Path, mae_path: str, mae: ltrp.MAE
) -> None:
    cfg = ScoreConfig(source=str(_corpus(tmp_path)), mae=mae_path, output=str(tmp_path / "out"), shard_size=1)
    shards = plan_corpus(cfg.source, cfg.shard_size).shards
    metadata = _metadata(cfg)

    names = {f.name for f in dataclasses.fields(ScoreConfig)}
    assert names >= MAY_CHANGE and set(identity_fields(cfg)) == names - MAY_CHANGE
    derived = {"plan_digest", "mae_sha256", "mae_config"}
    assert metadata["fingerprint"] == sorted((names - MAY_CHANGE) | derived)
    assert all(metadata[name] == getattr(cfg, name) for name in names - MAY_CHANGE)
    assert metadata["plan_digest"] == plan_digest(shards) != plan_digest(shards[:1])
    assert metadata["mae_sha256"] == mae.checkpoint.sha256 and metadata["mae_uri"] == mae_path
    assert metadata["mae_config"] == dataclasses.asdict(mae.cfg)
    assert json.loads(json.dumps(metadata)) == metadata  # what a resume compares, after the JSON file


def test_every_identity_field_is_covered_here(tmp_path: Path) -> None:
    assert set(RESULT_CHANGES) == set(identity_fields(_cfg(tmp_path)))


@pytest.mark.parametrize("field", sorted(RESULT_CHANGES))
def test_a_resume_with_another_identity_setting_is_refused(tmp_path: Path, mae_path: str, field: str) -> None:
    cfg = _cfg(tmp_path, mae_path, source=str(_corpus(tmp_path)))
    _scores(cfg).claim(_metadata(cfg))
    value = RESULT_CHANGES[field]
    if field == "source":
        value = str(shutil.copytree(cfg.source, tmp_path / value))
    # encoder mode records its slot; the plan names the images' URIs and cuts the shards
    derived = {
        "mode": "encoder_slot, mode",
        "source": "plan_digest, source",
        "shard_size": "plan_digest, shard_size",
    }
    differs = derived.get(field, field)
    with pytest.raises(ValueError, match=rf"differs in: {differs}\)"):
        _scores(cfg).check(_metadata(dataclasses.replace(cfg, **{field: value})))


def test_a_job_on_an_output_of_another_is_refused_before_any_work(tmp_path: Path, mae_path: str) -> None:
    cfg = _cfg(tmp_path, mae_path, source=str(_corpus(tmp_path)))
    ScoreJob(cfg).out.claim(ScoreJob(cfg).metadata)
    with pytest.raises(InputError, match=r"differs in: seed\)"):
        ScoreJob(dataclasses.replace(cfg, seed=1))


def test_an_encoder_mode_table_of_the_dropped_slot_kind_is_not_resumed(tmp_path: Path, mae_path: str) -> None:
    cfg = _cfg(tmp_path, mae_path, mode="encoder", source=str(_corpus(tmp_path)))
    metadata = _metadata(cfg)
    assert metadata["encoder_slot"] == "mask_token" and "encoder_slot" in metadata["fingerprint"]
    decoder = _metadata(dataclasses.replace(cfg, mode="decoder"))
    assert "encoder_slot" not in decoder  # decoder mode is unchanged: its older tables still resume
    # An encoder-mode table written before v's slot held the mask token: the same, without the key.
    older = {k: v for k, v in metadata.items() if k != "encoder_slot"}
    older["fingerprint"] = [k for k in metadata["fingerprint"] if k != "encoder_slot"]
    _scores(cfg).claim(older)
    with pytest.raises(ValueError, match=r"differs in: encoder_slot\)"):
        _scores(cfg).check(metadata)


def test_a_resume_with_other_execution_settings_is_the_same_job(tmp_path: Path, mae_path: str) -> None:
    cfg = _cfg(tmp_path, mae_path, source=str(_corpus(tmp_path)))
    _scores(cfg).claim(_metadata(cfg))
    moved = str(tmp_path / "moved.pth")
    shutil.copy(mae_path, moved)  # the same bytes elsewhere
    execution = {"workers": 3, "max_workers": 5, "worker_cpus": 2.0, "threads": 1, "device": "cpu"}
    faster = dataclasses.replace(cfg, mae=moved, batch_size=7, **execution)
    assert _scores(cfg).check(_metadata(faster)) is True
