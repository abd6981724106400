"""Real images that install offline, for the demo and the tests: Fashion-MNIST (labelled, written as an
ImageFolder of PNGs; Debian's package, or Zalando's files downloaded), scikit-image's bundled photos, and
a random demo MAE.

    python -m ltrp.data.datasets data/fashion-mnist   # download Fashion-MNIST there (`make fashion-mnist`)
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import sys
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import skimage.data
import torch
from PIL import Image

from ltrp.core.mae import GEOMETRIES, MAE
from ltrp.data.checkpoints import save_mae

#: Where Fashion-MNIST's 4 files are read: this variable's folder, else Debian's package's.
FASHION_MNIST_VARIABLE = "LTRP_FASHION_MNIST"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
#: Zalando's official downloads (github.com/zalandoresearch/fashion-mnist): FASHION_MNIST_URL + file name.
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
#: sha256 of each file's decompressed content. Not of the .gz files: Debian recompressed Zalando's (the
#: gzip bytes differ, Zalando's published MD5s match only theirs), but the idx bytes inside are the same.
FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
#: Label index -> folder name (Zalando's class names, made path-safe).
FASHION_MNIST_CLASSES = (
    "T-shirt_top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle_boot",
)
_FILES = {"train": "train", "test": "t10k"}


def fashion_mnist_folder() -> Path:
    """The folder holding Fashion-MNIST's 4 files: $LTRP_FASHION_MNIST when set, else Debian's."""
    return Path(os.environ.get(FASHION_MNIST_VARIABLE) or DEBIAN_FASHION_MNIST)


def read_fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) uint8) of the "train" (60,000) or "test" (10,000) split,
    from `fashion_mnist_folder()`.

    Raises:
        FileNotFoundError: the folder or one of the split's files is missing.
        ValueError: a file is not Zalando's (truncated, corrupted, another data set).
    """
    images = np.frombuffer(_read(f"{_FILES[split]}-images-idx3-ubyte.gz"), np.uint8, offset=16)
    labels = np.frombuffer(_read(f"{_FILES[split]}-labels-idx1-ubyte.gz"), np.uint8, offset=8)
    return images.reshape(-1, 28, 28), labels


def _read(name: str) -> bytes:
    """The checked content of the file `name` of the folder; the errors say how to get the files."""
    folder = fashion_mnist_folder()
    if not (folder / name).is_file():
        missing = folder / name if folder.is_dir() else folder
        raise FileNotFoundError(_how_to_get_it(f"{missing} is missing"))
    try:
        return _unpack(folder / name, name)
    except ValueError as err:
        raise ValueError(_how_to_get_it(str(err))) from err


def _how_to_get_it(problem: str) -> str:
    """`problem`, where the folder comes from, and the two ways to get the files."""
    return (
        f"Fashion-MNIST: {problem}. Its folder is ${FASHION_MNIST_VARIABLE} when set, else "
        f"{DEBIAN_FASHION_MNIST}; get the 4 files with Debian's package (sudo apt-get install "
        "dataset-fashion-mnist) or with `make fashion-mnist` (where that package is out of reach, it "
        f"downloads Zalando's into data/fashion-mnist; set {FASHION_MNIST_VARIABLE} to that folder, as "
        "make's targets do)"
    )


def _unpack(path: Path, name: str) -> bytes:
    """The decompressed bytes of the file at `path`, refused unless they are those of Zalando's file
    `name`. Hashing them costs about 0.04 s for the 47 MB of the training images, next to 0.3 s or more
    to decompress them: done on every read, with no cache to go stale."""
    try:
        with gzip.open(path) as f:
            content = f.read()
    except (OSError, EOFError, zlib.error) as err:  # truncated, or not gzip at all
        raise ValueError(f"{path} is not a complete gzip file ({err})") from err
    if hashlib.sha256(content).hexdigest() != FASHION_MNIST_SHA256[name]:
        raise ValueError(f"{path} does not hold Zalando's {name}: the sha256 of its content differs")
    return content


def download_fashion_mnist(folder: Path) -> Path:
    """Downloads Zalando's 4 files from FASHION_MNIST_URL into `folder` (those already there are kept);
    returns it. A file is checked before it takes its name, so a failed or wrong download leaves none.

    Raises:
        ValueError: a downloaded file is not Zalando's.
        urllib.error.URLError: a download failed.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for name in FASHION_MNIST_SHA256:
        if not (folder / name).exists():
            _download(name, folder / name)
    return folder


def _download(name: str, path: Path) -> None:
    """Zalando's file `name` into `path`, through a `.part` file that is removed whatever happens."""
    part = path.with_name(f"{name}.part")
    try:
        with urllib.request.urlopen(FASHION_MNIST_URL + name, timeout=60) as response, part.open("wb") as out:
            shutil.copyfileobj(response, out)
        _unpack(part, name)
        part.replace(path)
    finally:
        part.unlink(missing_ok=True)


def write_fashion_mnist(folder: Path, split: str, count: int) -> Path:
    """Writes the first `count` images of a split as FOLDER/CLASS/NNNNN.png (kept if already there)."""
    images, labels = read_fashion_mnist(split)
    for i in range(min(count, len(images))):
        path = folder / FASHION_MNIST_CLASSES[labels[i]] / f"{i:05d}.png"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(path)
    return folder


#: scikit-image's bundled photos: colour and grayscale, 191 to 1000 px, nothing to download.
SAMPLE_PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "coins", "hubble_deep_field", "rocket")


def write_sample_photos(folder: Path) -> Path:
    """Writes the sample photos as JPEG files into `folder` (kept if already there); returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in SAMPLE_PHOTOS:
        path = folder / f"{name}.jpg"
        if not path.exists():
            Image.fromarray(getattr(skimage.data, name)()).save(path, quality=92)
    return folder


def write_demo_mae(path: Path, *, seed: int = 0) -> Path:
    """Writes a randomly initialised small MAE (224 px, 16 px patches) unless one is already there.
    Its scores show the machinery working, not what matters in an image: that needs a trained MAE."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(seed)
        save_mae(MAE(GEOMETRIES["mae_vit_demo_patch16"]), str(path))
    return path


if __name__ == "__main__":
    print(f"Fashion-MNIST's 4 files are in {download_fashion_mnist(Path(sys.argv[1]))}")
