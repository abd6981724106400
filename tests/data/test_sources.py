import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ltrp.data.images import center_view, render_view
from ltrp.data.sources import Shard, describe_passed_over, plan_corpus, plan_digest, read_bytes, read_shard


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
