"""Real images that install offline, for the demo and the tests: Debian's Fashion-MNIST (labelled, written
as an ImageFolder of PNGs), scikit-image's bundled photos, and a random demo MAE."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import skimage.data
import torch
from PIL import Image

from ltrp.core.mae import GEOMETRIES, MAE
from ltrp.data.checkpoints import save_mae

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
