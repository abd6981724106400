"""Image corpora as deterministic shards: local folders, `s3://` prefixes, manifests and tar shards.

A shard is the unit of work and of commit: the scoring job writes each shard's rows in one file, so
re-running a job skips finished shards and redoes unfinished ones whole. Shards are planned from a
sorted listing, so the same corpus gives the same shards on every run.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import posixpath
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from ltrp.data.images import IMAGE_SUFFIXES

TAR_SEPARATOR = "#"  # uri of a tar member: s3://bucket/shard-000.tar#key.jpg


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
    """Splits a corpus into shards.

    Args:
        source: a folder or prefix (local or any fsspec URL) searched recursively for images
            (ImageFolder layout: the top-level folder names the label) and `.tar` shards; a `.tar`
            file; or a manifest (`.parquet` / `.csv` with a `uri` column, optional `image_id` and
            `label`; relative uris are relative to the manifest's folder).
        shard_size: images per shard for files (a tar file is always one shard).

    Raises:
        FileNotFoundError: the source is missing or holds no images or tar shards.
        ValueError: a manifest without a uri column, with empty uris or duplicate ids.
    """
    lowered = source.lower()
    passed_over: Counter[str] = Counter()
    if lowered.endswith((".parquet", ".csv")):
        files, tars = _manifest(source), []
    elif lowered.endswith(".tar"):
        files, tars = [], [source]
    else:
        files, tars, passed_over = _folder(source)
    if not files and not tars:
        raise FileNotFoundError(f"no images or .tar shards found under {source}")
    shards = [
        Shard(k, *map(tuple, zip(*files[start : start + shard_size], strict=True)))
        for k, start in enumerate(range(0, len(files), shard_size))
    ]
    shards += [Shard(len(shards) + i, tar=t) for i, t in enumerate(tars)]
    return Corpus(shards, dict(passed_over))


def plan_digest(shards: list[Shard]) -> str:
    """sha256 of a plan: two runs over the same corpus with the same shard size agree on it."""
    return hashlib.sha256("\n".join(s.to_json() for s in shards).encode()).hexdigest()


def _folder(root: str) -> tuple[list[tuple[str, str, str | None]], list[str], Counter[str]]:
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


def _manifest(uri: str) -> list[tuple[str, str, str | None]]:
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
