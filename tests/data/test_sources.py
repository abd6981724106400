import hashlib
import io
import itertools
import json
import posixpath
import tarfile
from collections import Counter
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ltrp.data import sources
from ltrp.data.images import IMAGE_SUFFIXES, center_view, render_view
from ltrp.data.sources import (
    Corpus,
    Shard,
    describe_passed_over,
    plan_corpus,
    plan_digest,
    read_bytes,
    read_shard,
)


def _touch(path: Path, data: bytes = b"x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_folder_plan_is_sorted_labelled_by_top_folder_and_chunked(tmp_path: Path) -> None:
    for name in ["cat/b.jpg", "cat/a.PNG", "dog/x/c.webp", "loose.bmp", "notes.txt", "dog/d.tiff"]:
        _touch(tmp_path / name)
    for name in ["cat/README", "dog/x/meta.TXT", "shards/s-000.tar"]:
        _touch(tmp_path / name)
    corpus = plan_corpus(str(tmp_path), shard_size=2)
    shards = corpus.shards
    assert [s.image_ids for s in shards[:3]] == [
        ("cat/a.PNG", "cat/b.jpg"),
        ("dog/d.tiff", "dog/x/c.webp"),
        ("loose.bmp",),
    ]
    assert [s.labels for s in shards[:3]] == [("cat", "cat"), ("dog", "dog"), (None,)]
    assert shards[3].tar.endswith("shards/s-000.tar") and shards[3].index == 3
    assert plan_digest(shards) == plan_digest(plan_corpus(str(tmp_path), shard_size=2).shards)
    assert plan_digest(shards) != plan_digest(plan_corpus(str(tmp_path), shard_size=3).shards)
    assert Shard.from_json(shards[0].to_json()) == shards[0]
    # Files that are neither images nor tar shards are passed over, and counted by suffix.
    assert corpus.passed_over == {".txt": 2, "": 1}
    assert describe_passed_over(corpus.passed_over) == (
        "3 files passed over (neither an image nor a .tar): (no suffix) 1, .txt 2"
    )


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_manifest_with_relative_uris_ids_and_labels(tmp_path: Path, fmt: str) -> None:
    _touch(tmp_path / "img" / "1.jpg", b"one")
    _touch(tmp_path / "img" / "2.jpg", b"two")
    table = pa.table(
        {"uri": ["img/2.jpg", str(tmp_path / "img" / "1.jpg")], "image_id": ["b", "a"], "label": [7, None]}
    )
    manifest = tmp_path / f"m.{fmt}"
    if fmt == "csv":
        manifest.write_text("uri,image_id,label\nimg/2.jpg,b,7\n" + f"{tmp_path}/img/1.jpg,a,\n")
    else:
        pq.write_table(table, manifest)
    (shard,) = plan_corpus(str(manifest), shard_size=10).shards
    assert shard.image_ids == ("a", "b")
    assert shard.labels[1] == "7" and shard.labels[0] in (None, "")
    assert [img.data for img in read_shard(shard)] == [b"one", b"two"]


def test_manifest_refuses_duplicates_and_missing_uri_column(tmp_path: Path) -> None:
    (tmp_path / "dup.csv").write_text("uri,image_id\na.jpg,x\nb.jpg,x\n")
    with pytest.raises(ValueError, match="'x' appears more than once"):
        plan_corpus(str(tmp_path / "dup.csv"), 4)
    (tmp_path / "nouri.csv").write_text("path\na.jpg\n")
    with pytest.raises(ValueError, match="no 'uri' column"):
        plan_corpus(str(tmp_path / "nouri.csv"), 4)
    pq.write_table(pa.table({"uri": ["a.jpg", None, ""]}), tmp_path / "holes.parquet")
    with pytest.raises(ValueError, match=r"holes\.parquet: row 1 has no uri \(2 rows without one\)"):
        plan_corpus(str(tmp_path / "holes.parquet"), 4)


def test_an_animated_gif_is_listed_and_read_as_its_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (32, 32), colour) for colour in ((200, 10, 10), (10, 200, 10))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    (shard,) = plan_corpus(str(tmp_path), 4).shards
    assert shard.image_ids == ("anim.gif",)
    (image,) = read_shard(shard)
    pixels = render_view(image.data, center_view(32, 32), 16)
    assert pixels.shape == (16, 16, 3) and tuple(pixels[8, 8]) == (200, 10, 10)


def test_missing_source_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        plan_corpus(str(tmp_path / "nowhere"), 4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        plan_corpus(str(tmp_path / "empty"), 4)


def test_tar_shard_groups_members_by_key_and_reads_labels(tmp_path: Path) -> None:
    _tar(
        tmp_path / "s.tar",
        {
            "a/001.jpg": b"img1",
            "a/001.cls": b"3\n",
            "a/002.png": b"img2",
            "a/002.json": json.dumps({"label": "dog"}).encode(),
            "a/003.jpg": b"img3",
            "a/003.json": b"{not json",
            "a/004.txt": b"caption only",
        },
    )
    (shard,) = plan_corpus(str(tmp_path / "s.tar"), 10).shards
    images = list(read_shard(shard))
    assert [(i.image_id, i.label, i.data) for i in images] == [
        ("a/001", "3", b"img1"),
        ("a/002", "dog", b"img2"),
        ("a/003", None, b"img3"),
    ]
    assert images[1].uri == f"{tmp_path}/s.tar#a/002.png"
    assert read_bytes(images[1].uri) == b"img2"


def test_unreadable_files_and_tars_become_errors(tmp_path: Path) -> None:
    (tmp_path / "broken.tar").write_bytes(b"not a tar at all" * 100)
    (shard,) = plan_corpus(str(tmp_path / "broken.tar"), 10).shards
    (image,) = read_shard(shard)
    assert image.data is None and "cannot read tar shard" in image.error
    gone = Shard(0, ("x",), (str(tmp_path / "gone.jpg"),), (None,))
    (image,) = read_shard(gone)
    assert "cannot read file" in image.error


# The planner as it was before it streamed (a full `find`, Python tuples sorted, one joined string to
# hash): the new one must give exactly its shards and digests, or outputs written before stop resuming.
def _plan_as_before(source: str, shard_size: int) -> Corpus:
    lowered = source.lower()
    passed_over: Counter[str] = Counter()
    if lowered.endswith((".parquet", ".csv")):
        files, tars = _manifest_as_before(source), []
    elif lowered.endswith(".tar"):
        files, tars = [], [source]
    else:
        files, tars, passed_over = _folder_as_before(source)
    if not files and not tars:
        raise FileNotFoundError(f"no images or .tar shards found under {source}")
    shards = [
        Shard(k, *map(tuple, zip(*files[start : start + shard_size], strict=True)))
        for k, start in enumerate(range(0, len(files), shard_size))
    ]
    shards += [Shard(len(shards) + i, tar=t) for i, t in enumerate(tars)]
    return Corpus(shards, dict(passed_over))


def _digest_as_before(shards: list[Shard]) -> str:
    return hashlib.sha256("\n".join(s.to_json() for s in shards).encode()).hexdigest()


def _folder_as_before(root: str) -> tuple[list[tuple[str, str, str | None]], list[str], Counter[str]]:
    fs, base = fsspec.core.url_to_fs(root)
    if not fs.isdir(base):
        raise FileNotFoundError(f"image source not found: {root}")
    files, tars, passed_over = [], [], Counter()
    for path in sorted(fs.find(base)):
        lowered = path.lower()
        if lowered.endswith(IMAGE_SUFFIXES):
            rel = posixpath.relpath(path, base)
            label = rel.split("/", 1)[0] if "/" in rel else None
            files.append((rel, fs.unstrip_protocol(path), label))
        elif lowered.endswith(".tar"):
            tars.append(fs.unstrip_protocol(path))
        else:
            passed_over[posixpath.splitext(lowered)[1]] += 1
    return files, tars, passed_over


def _manifest_as_before(uri: str) -> list[tuple[str, str, str | None]]:
    fs, path = fsspec.core.url_to_fs(uri)
    with fs.open(path, "rb") as f:
        table = pq.read_table(f) if path.lower().endswith(".parquet") else pcsv.read_csv(f)
    if "uri" not in table.column_names:
        raise ValueError(f"manifest {uri} has no 'uri' column (columns: {table.column_names})")
    base = posixpath.dirname(path)
    raw = table.column("uri").to_pylist()
    if empty := [i for i, u in enumerate(raw) if not u]:
        raise ValueError(f"manifest {uri}: row {empty[0]} has no uri ({len(empty)} rows without one)")
    uris = [
        u if "://" in u or u.startswith("/") else fs.unstrip_protocol(posixpath.join(base, u)) for u in raw
    ]
    ids = table.column("image_id").to_pylist() if "image_id" in table.column_names else uris
    labels = table.column("label").to_pylist() if "label" in table.column_names else [None] * len(uris)
    rows = sorted(zip(map(str, ids), uris, [None if x is None else str(x) for x in labels], strict=True))
    duplicates = [a for a, b in itertools.pairwise(rows) if a[0] == b[0]]
    if duplicates:
        raise ValueError(f"manifest {uri}: image_id {duplicates[0][0]!r} appears more than once")
    return rows


def _assert_plans_as_before(
    source: str, monkeypatch: pytest.MonkeyPatch, fs_type: type, sizes: tuple[int, ...] = (1, 2, 3, 1000)
) -> None:
    """Same shards, passed-over counts and digest as before, for each shard size, without `find`."""
    before = {size: _plan_as_before(source, size) for size in sizes}

    def no_find(*args: object, **kwargs: object) -> None:
        raise AssertionError("the planner must list directory by directory, never the whole tree at once")

    monkeypatch.setattr(fs_type, "find", no_find)
    for size, expected in before.items():
        corpus = plan_corpus(source, size)
        assert corpus == expected
        assert plan_digest(corpus.shards) == _digest_as_before(expected.shards)


# Names whose order trips a walk that sorts by anything but the full path: "-" < "." < "/" < "0",
# upper before lower case, a directory beside files that share its prefix, non-ASCII and astral-plane
# names, a directory whose name has an image suffix, an empty directory, hidden files.
TRICKY_TREE = [
    "a.png",
    "a-b",
    "a-b.jpg",
    "a b/c.jpg",
    "a!.jpg",
    "a/b.png",
    "a/c/d.jpg",
    "a/c.jpg",
    "a/\u00e4.png",
    "a/z.tar",
    "a0.jpg",
    "A.jpg",
    "A/x.jpg",
    "B.png/c.jpg",
    "\u00e4/\u00e9.jpg",
    "\u65e5\u672c/x.jpg",
    "\U0001f600.png",
    "\ufb01.png",
    "notes.txt",
    "ab/.hidden",
    "Z.tar",
]


def test_folder_listing_streams_in_the_order_of_sorted_find(tmp_path: Path) -> None:
    for name in TRICKY_TREE:
        _touch(tmp_path / name)
    (tmp_path / "empty" / "deeper").mkdir(parents=True)
    fs, base = fsspec.core.url_to_fs(str(tmp_path))
    assert list(sources._sorted_files(fs, base)) == sorted(fs.find(base))


def test_folder_plan_and_digest_are_as_before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in TRICKY_TREE:
        _touch(tmp_path / name)
    fs, _ = fsspec.core.url_to_fs(str(tmp_path))
    _assert_plans_as_before(str(tmp_path), monkeypatch, type(fs))


def test_s3_prefix_plan_is_as_before_and_leaves_the_listing_cache_small(
    s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = f"{s3_bucket}/corpus"
    fs, base = fsspec.core.url_to_fs(root)
    # S3 also holds an object "a" beside objects under "a/", and a sibling prefix that shares the name.
    fs.pipe({f"{base}/{name}": b"x" for name in [*TRICKY_TREE, "a"]} | {f"{base}-other/x.jpg": b"x"})
    for marker in ("corpus/", "corpus/a/c/"):  # directory markers: empty objects whose keys end in "/"
        fs.call_s3("put_object", Bucket=s3_bucket.removeprefix("s3://"), Key=marker, Body=b"")
    fs.invalidate_cache()
    assert list(sources._sorted_files(fs, base)) == sorted(fs.find(base))
    assert len(fs.dircache) > 2  # what `find` leaves: a listing of every directory under the prefix
    fs.invalidate_cache()
    _assert_plans_as_before(root, monkeypatch, type(fs), sizes=(2,))  # shard sizes: the local test
    assert len(fs.dircache) <= 2


def test_s3_keys_with_an_empty_path_segment_are_a_clear_error(s3_bucket: str) -> None:
    fs, base = fsspec.core.url_to_fs(f"{s3_bucket}/corpus")
    fs.pipe({f"{base}/a/c.jpg": b"x"})
    fs.call_s3("put_object", Bucket=s3_bucket.removeprefix("s3://"), Key="corpus/a//b.jpg", Body=b"x")
    with pytest.raises(ValueError, match=r"corpus/a: it holds keys with an empty path segment"):
        plan_corpus(f"{s3_bucket}/corpus", 4)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
@pytest.mark.parametrize(
    "columns",
    [
        # ids sorted by code point: upper case, digits as text, non-ASCII and astral-plane ids
        {"image_id": ["b", "a", "\u00e4", "A", "\U0001f600", "a b", "10", "9", "\ufb01"]},
        # without ids: sorted by the uri after the relative ones are made absolute
        {},
        # integer ids, and labels that Python's str writes unlike Arrow's cast (7.0, not 7)
        {"image_id": [30, 4, 100, 2, 7, 8, 9, 1, 5], "label": [7.0, None, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0]},
        # a duplicated id that is not the first row, and a null id ("None", as str writes it)
        {"image_id": ["z", "y", "z", "y", None, "c", "d", "e", "f"]},
        {"image_id": ["z", None, "q", "r", None, "c", "d", "e", "f"]},
    ],
    ids=["unicode-ids", "no-ids", "int-ids-float-labels", "duplicates", "null-ids"],
)
def test_manifest_plan_and_digest_are_as_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str, columns: dict[str, list]
) -> None:
    uris = ["img/2.jpg", f"{tmp_path}/img/1.jpg", "s3://b/k.jpg", "./x.jpg", "z/../y.png", "a.jpg"]
    uris += ["file:///abs.jpg", "B.jpg", "\u00e4.jpg"]
    table = pa.table({"uri": uris, **columns, "label": columns.get("label", ["cat", None, "dog"] * 3)})
    manifest = tmp_path / f"m.{fmt}"
    if fmt == "csv":
        pcsv.write_csv(table, manifest)
    else:
        pq.write_table(table, manifest, row_group_size=2)  # several chunks per column
    monkeypatch.setattr(sources, "PYTHON_BATCH", 4)  # several Python batches too
    for size in (1, 4, 100):
        try:
            expected: Corpus | str = _plan_as_before(str(manifest), size)
        except ValueError as err:
            with pytest.raises(ValueError) as raised:
                plan_corpus(str(manifest), size)
            assert str(raised.value) == str(err)
            continue
        corpus = plan_corpus(str(manifest), size)
        assert corpus == expected
        assert plan_digest(corpus.shards) == _digest_as_before(expected.shards)


def test_plan_digest_is_that_of_the_joined_json() -> None:
    shards = [Shard(0, ("\u00e4",), ("s3://b/\u00e4.jpg",), (None,)), Shard(1, tar="s3://b/s.tar")]
    for some in ([], shards[:1], shards):
        assert plan_digest(iter(some)) == _digest_as_before(some)
