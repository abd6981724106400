"""Real labelled images that install offline: Debian's Fashion-MNIST, written as an ImageFolder of PNGs."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
from PIL import Image

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
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


def read_fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) uint8) of the "train" (60,000) or "test" (10,000) split."""
    prefix = FASHION_MNIST / _FILES[split]
    if not FASHION_MNIST.exists():
        raise FileNotFoundError(
            f"{FASHION_MNIST} is missing: install Debian's dataset-fashion-mnist package "
            "(sudo apt-get install dataset-fashion-mnist; `make demo` and `make test` do)"
        )
    with gzip.open(f"{prefix}-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(f"{prefix}-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    return images, labels


def write_fashion_mnist(folder: Path, split: str, count: int) -> Path:
    """Writes the first `count` images of a split as FOLDER/CLASS/NNNNN.png (kept if already there)."""
    images, labels = read_fashion_mnist(split)
    for i in range(min(count, len(images))):
        path = folder / FASHION_MNIST_CLASSES[labels[i]] / f"{i:05d}.png"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(path)
    return folder
