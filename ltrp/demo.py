"""Inputs for the README's demo, which must run on a fresh machine with nothing downloaded."""

from __future__ import annotations

from pathlib import Path

import skimage.data
import torch
from PIL import Image

from ltrp.checkpoint import save_mae
from ltrp.mae import GEOMETRIES, MAE

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
