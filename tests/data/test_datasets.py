"""Fashion-MNIST from a folder other than Debian's, its checks, and its download (from a local server)."""

from __future__ import annotations

import gzip
import shutil
import threading
from collections.abc import Callable, Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ltrp.data import datasets
from ltrp.data.datasets import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_SHA256,
    FASHION_MNIST_VARIABLE,
    download_fashion_mnist,
    fashion_mnist_folder,
    read_fashion_mnist,
    write_fashion_mnist,
)

TEST_IMAGES, TEST_LABELS = "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"


@pytest.fixture(scope="module")
def installed() -> Path:
    """The folder the suite reads: Debian's, or the one `make` names when Debian's is out of reach."""
    folder = fashion_mnist_folder()
    missing = [name for name in FASHION_MNIST_SHA256 if not (folder / name).is_file()]
    assert not missing, f"{folder} lacks {missing}: `make fashion-mnist` gets them"
    return folder


@pytest.fixture
def copied(installed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the 4 files in a folder of their own, named by the variable."""
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    for name in FASHION_MNIST_SHA256:
        shutil.copyfile(installed / name, folder / name)
    monkeypatch.setenv(FASHION_MNIST_VARIABLE, str(folder))
    return folder


def test_the_variable_names_the_folder_the_jobs_read(installed: Path, copied: Path, tmp_path: Path) -> None:
    """The copy gives the installed files' images and labels, through the readers the jobs use."""
    images, labels = read_fashion_mnist("test")
    (copied / TEST_IMAGES).unlink()  # read again below only if the copy is what they read
    with pytest.raises(FileNotFoundError):
        read_fashion_mnist("test")
    shutil.copyfile(installed / TEST_IMAGES, copied / TEST_IMAGES)
    pngs = write_fashion_mnist(tmp_path / "pngs", "test", 3)

    with gzip.open(installed / TEST_IMAGES) as f:
        expected = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(installed / TEST_LABELS) as f:
        expected_labels = np.frombuffer(f.read(), np.uint8, offset=8)
    assert images.shape == (10_000, 28, 28) and np.array_equal(images, expected)
    assert np.array_equal(labels, expected_labels)
    for i in range(3):
        png = pngs / FASHION_MNIST_CLASSES[expected_labels[i]] / f"{i:05d}.png"
        assert np.array_equal(np.asarray(Image.open(png)), expected[i])


def _assert_says_how_to_get_it(message: str, *named: Path) -> None:
    for path in named:
        assert str(path) in message
    assert FASHION_MNIST_VARIABLE in message
    assert "dataset-fashion-mnist" in message and "make fashion-mnist" in message


def test_a_missing_file_or_folder_is_named(copied: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (copied / TEST_LABELS).unlink()
    with pytest.raises(FileNotFoundError) as missing_file:
        read_fashion_mnist("test")
    _assert_says_how_to_get_it(str(missing_file.value), copied / TEST_LABELS)

    monkeypatch.setenv(FASHION_MNIST_VARIABLE, str(copied / "absent"))
    with pytest.raises(FileNotFoundError) as missing_folder:
        read_fashion_mnist("test")
    _assert_says_how_to_get_it(str(missing_folder.value), copied / "absent")


def _truncated(data: bytes) -> bytes:
    """The first half of a .gz file, as an interrupted download leaves it."""
    return data[: len(data) // 2]


def _last_byte_changed(data: bytes) -> bytes:
    """A complete .gz file whose content differs from Zalando's in its last byte (a label)."""
    content = gzip.decompress(data)
    return gzip.compress(content[:-1] + bytes([content[-1] ^ 1]))


#: Ways a file goes wrong, and what the refusal says.
DAMAGES = [(_truncated, "not a complete gzip file"), (_last_byte_changed, "sha256")]


@pytest.mark.parametrize(("damage", "says"), DAMAGES)
def test_a_damaged_file_is_refused(copied: Path, damage: Callable[[bytes], bytes], says: str) -> None:
    """Refused before parsing, with the file named: not read as images that are wrong or cut short."""
    path = copied / TEST_LABELS  # small: damaged in milliseconds
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=says) as refused:
        read_fashion_mnist("test")
    _assert_says_how_to_get_it(str(refused.value), path)


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """An HTTP server on 127.0.0.1 standing in for Zalando's, serving the folder it yields."""
    served = tmp_path / "served"
    served.mkdir()
    handler = partial(SimpleHTTPRequestHandler, directory=str(served))
    with ThreadingHTTPServer(("127.0.0.1", 0), handler) as httpd:
        thread = threading.Thread(target=httpd.serve_forever, daemon=True)
        thread.start()
        monkeypatch.setattr(datasets, "FASHION_MNIST_URL", f"http://127.0.0.1:{httpd.server_port}/")
        monkeypatch.setenv("no_proxy", "127.0.0.1")  # a proxy set for the internet must not take it
        yield served
        httpd.shutdown()
        thread.join()


def test_the_download_fetches_and_checks_the_4_files(
    installed: Path, server: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in FASHION_MNIST_SHA256:
        shutil.copyfile(installed / name, server / name)
    folder = download_fashion_mnist(tmp_path / "data" / "fashion-mnist")

    assert sorted(p.name for p in folder.iterdir()) == sorted(FASHION_MNIST_SHA256)
    for name in FASHION_MNIST_SHA256:
        assert (folder / name).read_bytes() == (installed / name).read_bytes(), name
    expected_labels = read_fashion_mnist("test")[1]
    monkeypatch.setenv(FASHION_MNIST_VARIABLE, str(folder))
    assert np.array_equal(read_fashion_mnist("test")[1], expected_labels)


@pytest.mark.parametrize(("damage", "says"), DAMAGES)
def test_a_wrong_download_is_refused_and_leaves_nothing(
    installed: Path, server: Path, tmp_path: Path, damage: Callable[[bytes], bytes], says: str
) -> None:
    """The damaged file is refused, named, and neither it nor its .part is left; the others are kept."""
    for name in FASHION_MNIST_SHA256:
        shutil.copyfile(installed / name, server / name)
    (server / TEST_LABELS).write_bytes(damage((installed / TEST_LABELS).read_bytes()))
    folder = tmp_path / "downloaded"
    with pytest.raises(ValueError, match=says) as refused:
        download_fashion_mnist(folder)
    assert f"{TEST_LABELS}.part" in str(refused.value)
    assert sorted(p.name for p in folder.iterdir()) == sorted(set(FASHION_MNIST_SHA256) - {TEST_LABELS})
