"""Image decoding shared by every job: bytes -> RGB uint8 at the MAE's input size -> model tensor."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
#: What the official MAE checkpoints were trained on; the decoder predicts pixels in this space.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
#: ImageNet's mean colour: transparent areas become it, i.e. zero after normalisation.
_BACKGROUND = tuple(round(255 * m) for m in IMAGENET_MEAN)


class ImageDecodeError(ValueError):
    """An image that cannot be used; the message says why."""


def decode_center_crop(data: bytes, size: int) -> np.ndarray:
    """Encoded image bytes -> (size, size, 3) uint8 RGB: EXIF orientation applied, any mode converted
    to RGB, the central square cropped and resized (bicubic).

    Raises:
        ImageDecodeError: empty, undecodable or truncated data.
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale when that is enough
            img = _to_rgb(ImageOps.exif_transpose(img))
            return np.asarray(ImageOps.fit(img, (size, size), Image.Resampling.BICUBIC))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageDecodeError(f"cannot decode image: {err}") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: 16-bit grayscale scaled (PIL would clip it to white), alpha composited on
    the mean colour (dropping it would expose whatever colour hides under transparent pixels)."""
    if img.mode in _SIXTEEN_BIT_MODES:
        img = Image.fromarray((np.asarray(img).astype(np.int64).clip(0, 65535) >> 8).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", img.size, (*_BACKGROUND, 255)), img)
    return img.convert("RGB")


def to_model_input(batch: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(B, S, S, 3) uint8 -> (B, 3, S, S) float32, ImageNet mean/std normalised."""
    x = torch.as_tensor(batch).permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std
