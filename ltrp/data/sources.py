"""Image corpora as deterministic shards: local folders, `s3://` prefixes, manifests and tar shards.

A shard is the unit of work and of commit: the scoring job writes each shard's rows in one file, so
re-running a job skips finished shards and redoes unfinished ones whole. Shards are planned from a
sorted listing, so the same corpus gives the same shards on every run.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import sys
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from ltrp.data.images import IMAGE_SUFFIXES

TAR_SEPARATOR = "#"  # uri of a tar member: s3://bucket/shard-000.tar#key.jpg
#: Manifest values converted in Python at a time: bounds the Python objects alive at once.
PYTHON_BATCH = 1 << 16


@dataclass(frozen=True)
class Shard:
    """Either a list of image files, or one tar file in WebDataset layout (contents read when run)."""

    index: int
    image_ids: tuple[str, ...] = ()
    uris: tuple[str, ...] = ()
    labels: tuple[str | None, ...] = ()
    tar: str | None = None

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, text: str) -> Shard:
        d = json.loads(text)
        return cls(d["index"], tuple(d["image_ids"]), tuple(d["uris"]), tuple(d["labels"]), d["tar"])


@dataclass(frozen=True)
class SourceImage:
    """One image of a shard: its bytes, or why they could not be read."""

    image_id: str
    uri: str
    label: str | None
    data: bytes | None = None
    error: str | None = None


@dataclass(frozen=True)
class Corpus:
    """A corpus planned into shards, and the files its listing held that are neither images nor tar
    shards, by suffix ({".txt": 2, "": 1}): passed over, so counted, never dropped silently."""

    shards: list[Shard]
    passed_over: dict[str, int]


def describe_passed_over(passed_over: dict[str, int]) -> str:
    """'3 files passed over (neither an image nor a .tar): .json 1, .txt 2', or '' for none."""
    if not passed_over:
        return ""
    counts = ", ".join(f"{suffix or '(no suffix)'} {n}" for suffix, n in sorted(passed_over.items()))
    return f"{sum(passed_over.values())} files passed over (neither an image nor a .tar): {counts}"


def plan_corpus(source: str, shard_size: int) -> Corpus:
    """Splits a corpus into shards, in bounded memory: a folder is listed one directory at a time and
    its shards built as the listing streams; a manifest is sorted and checked in Arrow.

    Args:
        source: a folder or prefix (local or any fsspec URL) searched recursively for images
            (ImageFolder layout: the top-level folder names the label) and `.tar` shards; a `.tar`
            file; or a manifest (`.parquet` / `.csv` with a `uri` column, optional `image_id` and
            `label`; relative uris are relative to the manifest's folder).
        shard_size: images per shard for files (a tar file is always one shard).

    Returns:
        The shards, file shards first in listing order, then one shard per `.tar` in listing order.

    Raises:
        FileNotFoundError: the source is missing or holds no images or tar shards.
        ValueError: a manifest without a uri column, with empty uris or duplicate ids.
    """
    lowered = source.lower()
    passed_over: dict[str, int] = {}
    if lowered.endswith((".parquet", ".csv")):
        shards = _manifest_shards(source, shard_size)
    elif lowered.endswith(".tar"):
        shards = [Shard(0, tar=source)]
    else:
        shards, passed_over = _folder_shards(source, shard_size)
    if not shards:
        raise FileNotFoundError(f"no images or .tar shards found under {source}")
    return Corpus(shards, passed_over)


def plan_digest(shards: Iterable[Shard]) -> str:
    """sha256 of a plan: two runs over the same corpus with the same shard size agree on it.

    Hashed a shard at a time, never as one string; the digest is that of the shards' JSON joined by
    newlines, as it always was, so outputs written before keep resuming.
    """
    digest = hashlib.sha256()
    for k, shard in enumerate(shards):
        if k:
            digest.update(b"\n")
        digest.update(shard.to_json().encode())
    return digest.hexdigest()


def _file_shard(index: int, files: list[tuple[str, str, str | None]]) -> Shard:
    """A shard of (image_id, uri, label) rows."""
    return Shard(index, *map(tuple, zip(*files, strict=True)))


def _folder_shards(root: str, shard_size: int) -> tuple[list[Shard], dict[str, int]]:
    """Shards of a folder or prefix built while it is listed, and what it passed over by suffix."""
    fs, base = fsspec.core.url_to_fs(root)
    if not fs.isdir(base):
        raise FileNotFoundError(f"image source not found: {root}")
    shards: list[Shard] = []
    pending: list[tuple[str, str, str | None]] = []  # images of the shard being filled
    tars: list[str] = []  # tar shards come after every file shard, so their indices wait
    passed_over: Counter[str] = Counter()
    for path in _sorted_files(fs, base):
        lowered = path.lower()
        if lowered.endswith(IMAGE_SUFFIXES):
            rel = posixpath.relpath(path, base)
            # Interned: a folder's images share one label string, not one copy each.
            label = sys.intern(rel.split("/", 1)[0]) if "/" in rel else None
            pending.append((rel, fs.unstrip_protocol(path), label))
            if len(pending) == shard_size:
                shards.append(_file_shard(len(shards), pending))
                pending = []
        elif lowered.endswith(".tar"):
            tars.append(fs.unstrip_protocol(path))
        else:
            passed_over[posixpath.splitext(lowered)[1]] += 1
    if pending:
        shards.append(_file_shard(len(shards), pending))
    shards += [Shard(len(shards) + i, tar=t) for i, t in enumerate(tars)]
    return shards, dict(passed_over)


def _sorted_files(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[str]:
    """The files under a directory in the order of `sorted(fs.find(path))`, one listing at a time.

    Depth first, each directory's entries sorted by name with a directory's as its name + "/": every
    path under directory `d` starts with `d/`, so it sorts against a sibling as `d/` does, and the whole
    subtree falls where `sorted(find)` puts it. Only the directories on the way down are held, each as
    its sorted (name, is_directory) pairs, never the whole tree.
    """
    for name, is_directory in _sorted_listing(fs, path):
        if is_directory:
            yield from _sorted_files(fs, name)
        else:
            yield name


def _sorted_listing(fs: fsspec.AbstractFileSystem, path: str) -> list[tuple[str, bool]]:
    """One directory's entries as (name, is_directory), in the order `_sorted_files` walks them."""
    fs.invalidate_cache(path)  # a fresh listing, as `find` makes, not one cached earlier in the process
    try:
        infos = fs.ls(path, detail=True)
    finally:
        fs.invalidate_cache(path)  # so the listing cache (s3fs) never grows to the whole corpus
    entries = []
    for info in infos:
        name = info["name"]
        is_directory = info["type"] == "directory"
        if is_directory and name.rstrip("/") == path:
            # S3 keys with an empty segment (`a//b.jpg`): the "directory" `a/` lists as `a` again, so
            # walking into it would never end, and no listing by directory reaches those keys.
            raise ValueError(
                f"cannot list {fs.unstrip_protocol(path)}: it holds keys with an empty path segment "
                f"({name}/...), which no listing by directory reaches; list them in a manifest"
            )
        entries.append((name.rstrip("/") + "/" if is_directory else name, name, is_directory))
    entries.sort()
    return [(name, is_directory) for _, name, is_directory in entries]


def _manifest_shards(uri: str, shard_size: int) -> list[Shard]:
    """Shards of a manifest's rows sorted by image_id (by uri without one), sorted and checked in Arrow."""
    fs, path = fsspec.core.url_to_fs(uri)
    with fs.open(path, "rb") as f:
        table = pq.read_table(f) if path.lower().endswith(".parquet") else pcsv.read_csv(f)
    if "uri" not in table.column_names:
        raise ValueError(f"manifest {uri} has no 'uri' column (columns: {table.column_names})")
    uris = table.column("uri").cast(pa.large_string())
    empty = pc.or_kleene(pc.is_null(uris), pc.equal(pc.binary_length(uris), 0))
    if (count := pc.sum(empty).as_py() or 0) > 0:
        first = pc.index(empty, True).as_py()
        raise ValueError(f"manifest {uri}: row {first} has no uri ({count} rows without one)")
    columns = {"uri": _absolute_uris(uris, fs, posixpath.dirname(path))}
    key = "uri"  # without ids, a row's id is its uri
    if "image_id" in table.column_names:
        columns["image_id"], key = _str_column(table.column("image_id")), "image_id"
    if "label" in table.column_names:
        columns["label"] = table.column("label")
    del table  # the columns above are all that is needed of it
    # Arrow orders strings by their UTF-8 bytes, which is Python's order of code points. Ids are
    # unique once the check below passes, so sorting by id alone orders the rows as (id, uri, label).
    rows = pa.table(columns).sort_by(key)
    ids = rows.column(key)
    repeated = pc.index(pc.equal(ids[:-1], ids[1:]), True).as_py() if len(ids) > 1 else -1
    if repeated >= 0:
        raise ValueError(f"manifest {uri}: image_id {ids[repeated].as_py()!r} appears more than once")
    return [
        _manifest_shard(k, rows.slice(start, shard_size), key)
        for k, start in enumerate(range(0, rows.num_rows, shard_size))
    ]


def _manifest_shard(index: int, rows: pa.Table, key: str) -> Shard:
    """A shard of sorted manifest rows whose ids are column `key`; labels as Python's `str` writes
    them (a float 7.0 as "7.0", where Arrow's cast writes "7"), as planned before."""
    uris = tuple(rows.column("uri").to_pylist())
    ids = uris if key == "uri" else tuple(rows.column(key).to_pylist())  # the same strings, held once
    if "label" in rows.column_names:
        # Interned: rows with the same label share one string, not one copy each.
        labels = tuple(None if x is None else sys.intern(str(x)) for x in rows.column("label").to_pylist())
    else:
        labels = (None,) * rows.num_rows
    return Shard(index, ids, uris, labels)


def _absolute_uris(uris: pa.ChunkedArray, fs: fsspec.AbstractFileSystem, base: str) -> pa.ChunkedArray:
    """Uris with the relative ones made absolute against the manifest's folder `base`."""
    absolute = pc.or_(pc.match_substring(uris, "://"), pc.starts_with(uris, "/"))
    if pc.all(absolute).as_py():
        return uris  # no Python pass over a manifest of absolute uris

    def resolve(u: str) -> str:
        return u if "://" in u or u.startswith("/") else fs.unstrip_protocol(posixpath.join(base, u))

    return _map_strings(uris, resolve)


def _str_column(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Values as Python's `str` writes them, as ids were planned before (a null as "None")."""
    is_text = pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
    if is_text and column.null_count == 0:
        return column.cast(pa.large_string())
    return _map_strings(column, str)


def _map_strings(column: pa.ChunkedArray, fn: Callable[[Any], str]) -> pa.ChunkedArray:
    """`fn` of every value, a batch at a time: only one batch is ever Python objects."""
    return pa.chunked_array(
        [
            pa.array(map(fn, column.slice(start, PYTHON_BATCH).to_pylist()), pa.large_string())
            for start in range(0, len(column), PYTHON_BATCH)
        ],
        pa.large_string(),
    )


def read_shard(shard: Shard) -> Iterator[SourceImage]:
    """The images of a shard, in a fixed order; unreadable ones carry an error instead of bytes."""
    if shard.tar is not None:
        yield from _read_tar(shard.tar)
        return
    for image_id, uri, label in zip(shard.image_ids, shard.uris, shard.labels, strict=True):
        try:
            yield SourceImage(image_id, uri, label, data=read_bytes(uri))
        except OSError as err:
            yield SourceImage(image_id, uri, label, error=f"cannot read file: {err}")


def read_many(uris: list[str]) -> list[bytes]:
    """Bytes of many images, in order; each tar file among them is streamed once, not once per member."""
    wanted: dict[str, set[str]] = {}
    for uri in uris:
        if _is_tar_member(uri):
            tar_uri, member = uri.split(TAR_SEPARATOR, 1)
            wanted.setdefault(tar_uri, set()).add(member)
    found = {
        f"{tar_uri}{TAR_SEPARATOR}{name}": data
        for tar_uri, members in wanted.items()
        for name, data in _tar_members(tar_uri, members).items()
    }
    return [found[u] if _is_tar_member(u) else read_bytes(u) for u in uris]


def read_bytes(uri: str) -> bytes:
    """Bytes of an image file, or of a tar member (`shard.tar#key.jpg`: scans the tar; slow)."""
    if _is_tar_member(uri):
        tar_uri, member = uri.split(TAR_SEPARATOR, 1)
        return _tar_members(tar_uri, {member})[member]
    with fsspec.open(uri, "rb") as f:
        return f.read()


def _is_tar_member(uri: str) -> bool:
    return TAR_SEPARATOR in uri and uri.split(TAR_SEPARATOR, 1)[0].lower().endswith(".tar")


def _tar_members(tar_uri: str, names: set[str]) -> dict[str, bytes]:
    """{name: bytes} of the named members, in one streaming pass over the tar."""
    found = {}
    with fsspec.open(tar_uri, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for info in tar:
            if info.name in names:
                found[info.name] = tar.extractfile(info).read()
    missing = names - found.keys()
    if missing:
        raise FileNotFoundError(f"{sorted(missing)[0]} not in {tar_uri}")
    return found


def _webdataset_key(name: str) -> tuple[str, str]:
    """WebDataset: a member's key is its path up to the first dot of the file name; the rest is its
    extension (`a/b.c.jpg` -> ("a/b", "c.jpg"))."""
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(folder, stem), ext.lower()


def _read_tar(uri: str) -> Iterator[SourceImage]:
    samples: dict[str, dict[str, bytes]] = {}
    try:
        with fsspec.open(uri, "rb") as f, tarfile.open(fileobj=io.BufferedReader(f), mode="r|*") as tar:
            for info in tar:
                if info.isfile():
                    key, ext = _webdataset_key(info.name)
                    samples.setdefault(key, {})[ext] = tar.extractfile(info).read()
    except (OSError, tarfile.TarError, EOFError) as err:
        yield SourceImage(uri, uri, None, error=f"cannot read tar shard: {err}")
        return
    for key in sorted(samples):
        members = samples[key]
        image_ext = next((e for e in sorted(members) if f".{e}".endswith(IMAGE_SUFFIXES)), None)
        if image_ext is None:
            continue  # a sample without an image (e.g. only metadata) is not an image
        yield SourceImage(
            key, f"{uri}{TAR_SEPARATOR}{key}.{image_ext}", _tar_label(members), data=members[image_ext]
        )


def _tar_label(members: dict[str, bytes]) -> str | None:
    """From a `cls` member (the class as text), else a `json` member's label / cls / class field."""
    try:
        if "cls" in members:
            return members["cls"].decode().strip()
        meta = json.loads(members["json"]) if "json" in members else {}
    except (UnicodeDecodeError, ValueError):
        return None  # unreadable metadata costs the label, not the image
    field = next((f for f in ("label", "cls", "class") if isinstance(meta, dict) and f in meta), None)
    return None if field is None else str(meta[field])
