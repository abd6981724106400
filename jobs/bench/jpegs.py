"""The benchmarks' JPEG corpus: ImageNet-sized cuts of scikit-image's photos (no network needed)."""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence

import numpy as np
import skimage.data
from PIL import Image


def imagenet_sized_jpegs(
    count: int, photos: Sequence[str], seed: int = 0, side: int = 500
) -> Iterator[bytes]:
    """`count` JPEGs (quality 90), each a random crop of one of scikit-image's `photos` (taken in turn,
    as RGB), scaled to a longer side of `side` px (500, about 500 x 375: ImageNet's typical images)."""
    rng = np.random.default_rng(seed)
    arrays = [np.asarray(Image.fromarray(getattr(skimage.data, n)()).convert("RGB")) for n in photos]
    for i in range(count):
        photo = arrays[i % len(arrays)]
        h, w = photo.shape[:2]
        ch, cw = int(h * rng.uniform(0.6, 1)), int(w * rng.uniform(0.6, 1))
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        img = Image.fromarray(photo[top : top + ch, left : left + cw])
        scale = side / max(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        yield buf.getvalue()
