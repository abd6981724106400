"""The stages and the output folder every corpus job shares (`ltrp.pipeline.shards`), as plain functions,
without Ray: decoding shards into rows, the output folder that commits each shard exactly once, the
commit stage, and file groups of several shards per file. They run on the scoring job's rows (the
scoring stage itself: test_score_stages.py)."""

import dataclasses
import io
import json
import random
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from support import (
    TINY_GRID,
    TINY_SIZE,
    decode,
    image,
    job_metadata,
    pixels,
    score_config,
    score_output,
    write_shard,
)

import ltrp
from ltrp.data.images import View, render_view, view_geometry
from ltrp.data.sources import Shard
from ltrp.data.tables import ERRORS_SCHEMA, SCORES_SCHEMA
from ltrp.pipeline.lease import Lease, LeaseHeld
from ltrp.pipeline.score_stages import ShardScorer
from ltrp.pipeline.shards import FileGroups, ShardedOutput, commit_shards

#: A file per shard, as far as the tests of one shard's commit are concerned (shards 0-3).
GROUPS = FileGroups(size=1, shards=4)


# -- decode -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("views", "crop", "flip"), [(1, "center", False), (3, "random", True)])
def test_decode_gives_one_row_per_image_and_view(tmp_path: Path, views: int, crop: str, flip: bool) -> None:
    files = {"b.png": image(0, 40, 90), "a.png": image(1, 70, 30, gray=True)}
    shard = write_shard(tmp_path, 0, files)
    cfg = score_config(tmp_path, views=views, crop=crop, flip=flip, mask_ratio=0.75, seed=3)
    rows = decode(cfg, shard).to_pylist()

    # In the shard's order, each image's views in order.
    assert [(r["image_id"], r["view"]) for r in rows] == [
        (i, v) for i in ("b.png", "a.png") for v in range(views)
    ]
    sizes = {"b.png": (90, 40), "a.png": (30, 70)}
    for row in rows:
        image_id, view, data = row["image_id"], row["view"], files[row["image_id"]]
        assert row["error"] is None
        assert row["uri"] == str(tmp_path / image_id) and row["label"] == f"L{image_id[0]}"
        assert len(row["pixels"]) == TINY_SIZE * TINY_SIZE * 3
        geometry = view_geometry(image_id, view, *sizes[image_id], seed=3, crop=crop, flip=flip)
        assert (tuple(row["crop_box"]), row["flip"]) == (geometry.box, geometry.flip)
        # The pixels are exactly the stored view replayed from the source bytes (what training does).
        np.testing.assert_array_equal(
            pixels(row), render_view(data, View(tuple(row["crop_box"]), row["flip"]), TINY_SIZE)
        )
        expected = ltrp.visible_sets([image_id], grid=TINY_GRID, mask_ratio=0.75, seed=3, view=view)[0]
        assert row["visible"] == expected.tolist() and len(row["visible"]) == 16
    if views > 1:  # each view of an image has its own crop and visible set
        for image_id in files:
            mine = [r for r in rows if r["image_id"] == image_id]
            assert len({tuple(r["crop_box"]) for r in mine}) == views
            assert len({tuple(r["visible"]) for r in mine}) == views


def test_decoding_is_deterministic_and_follows_the_seed(tmp_path: Path) -> None:
    shard = write_shard(tmp_path, 0, {"x.png": image(0, 50, 80), "y.png": image(1, 64, 64)})
    cfg = score_config(tmp_path, views=2, crop="random", flip=True, mask_ratio=0.75)
    first, again = decode(cfg, shard), decode(cfg, shard)
    assert first.equals(again)
    other = decode(dataclasses.replace(cfg, seed=1), shard)
    for column in ("crop_box", "visible", "pixels"):
        assert first.column(column).to_pylist() != other.column(column).to_pylist()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"certainly not a PNG", "cannot decode image"),
        (b"", "empty file"),
        (image(2, 8, 40), "too small: 40x8"),
        (None, "cannot read file"),  # listed in the shard, gone from the disk
    ],
)
def test_an_unusable_image_becomes_one_error_row(tmp_path: Path, data: bytes | None, reason: str) -> None:
    shard = write_shard(tmp_path, 5, {"good.png": image(0, 32, 32), "bad.png": data})
    table = decode(score_config(tmp_path, views=2), shard)
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
    (row,) = decode(score_config(tmp_path), shard).to_pylist()
    assert (row["shard"], row["shard_rows"]) == (9, 1)
    assert row["error"] == "shard holds no images"
    assert row["image_id"] == (shard.tar or "9") and row["pixels"] is None


def test_every_row_carries_its_shard_and_the_shards_row_count(tmp_path: Path) -> None:
    shards = [
        write_shard(
            tmp_path / "s7", 7, {"a.png": image(0, 30, 30), "b.png": b"junk", "c.png": image(1, 40, 20)}
        ),
        Shard(2),  # no images: one row
        write_shard(tmp_path / "s0", 0, {"d.png": image(2, 20, 60)}),
    ]
    table = decode(score_config(tmp_path, views=2), *shards)
    counts = Counter(table.column("shard").to_pylist())
    assert counts == {7: 5, 2: 1, 0: 2}  # 2 views of 2 images + 1 error; 1; 2 views
    for row in table.to_pylist():
        assert row["shard_rows"] == counts[row["shard"]]
    assert table.column("shard").to_pylist() == [7] * 5 + [2] + [0] * 2  # shard by shard


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
    files = {"b.png": image(0, 40, 40), "z.png": b"junk", "a.png": image(1, 50, 30)}
    cfg = score_config(images, mae_path, views=2)
    shard = write_shard(images, 3, files)
    table = ShardScorer(cfg, mae.checkpoint.sha256, gpu=False)(decode(cfg, shard))
    table = table.take([3, 0, 4, 2, 1])  # a0, b0, a1, z, b1
    return job_metadata(cfg), table, images


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
    assert written == ["_errors/part-00003.parquet", "scores/part-00003.parquet"]
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
    failed = pq.read_table(Path(output) / "_errors" / "part-00003.parquet")
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
        f"{kind}/part-0000{i}.parquet" for kind in ("scores", "_errors") for i in range(3)
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
            pq.read_table(Path(output) / kind / f"part-{g:05d}.parquet") for kind in ("scores", "_errors")
        )
        members = groups.members(g)
        assert rows.equals(pa.concat_tables([expected[i][0] for i in members]).cast(rows.schema))
        assert errors.equals(pa.concat_tables([expected[i][1] for i in members]).cast(errors.schema))
        assert json.loads(rows.schema.metadata[b"ltrp"]) == metadata
    out.finish(5)
    assert {f for f in _files(Path(output)) if not f.startswith("reference")} == {
        "_ltrp_job.json",
        "_SUCCESS",
        *(f"{kind}/part-0000{g}.parquet" for kind in ("scores", "_errors") for g in range(3)),
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
