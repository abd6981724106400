"""Image decoding and views, shared by every job: `render_views` renders an image's views from its
bytes (one decode serves many views), and `render_view` one of them with the same pixels, so training
replays a stored `View` exactly as the scoring job rendered it.

A view is a crop box in the image's displayed (EXIF-oriented) pixel coordinates plus a horizontal
flip, drawn as a pure function of (seed, image id, view number): see `view_geometry`.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from ltrp.core.options import Crop

if TYPE_CHECKING:
    import torch

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")  # GIF: its first frame
#: What the official MAE checkpoints were trained on; the decoder predicts pixels in this space.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
#: ImageNet's mean colour: transparent areas become it, i.e. zero after normalisation.
_BACKGROUND = tuple(round(255 * m) for m in IMAGENET_MEAN)
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


class ImageDecodeError(ValueError):
    """An image that cannot be used; the message says why."""


@dataclass(frozen=True)
class View:
    """A crop box (left, top, right, bottom) in displayed source pixels, then an optional mirror."""

    box: tuple[float, float, float, float]
    flip: bool = False


@dataclass(frozen=True)
class ImageLimits:
    """Images outside these bounds are refused (and recorded) instead of decoded."""

    min_side: int = 16  # shorter side, in pixels
    max_pixels: int = 89_478_485  # PIL's own decompression-bomb threshold


def _header(data: bytes, limits: ImageLimits) -> tuple[int, int, bool]:
    """(stored width, stored height, whether EXIF orientation swaps them), without decoding pixels."""
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            transposed = img.getexif().get(0x0112, 1) in _TRANSPOSED_ORIENTATIONS
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageDecodeError(f"cannot decode image: {err}") from None
    if width * height > limits.max_pixels:
        raise ImageDecodeError(f"too large: {width}x{height} exceeds {limits.max_pixels} pixels")
    if min(width, height) < limits.min_side:
        raise ImageDecodeError(f"too small: {width}x{height}, shorter side below {limits.min_side} px")
    return width, height, transposed


def displayed_size(data: bytes, limits: ImageLimits = ImageLimits()) -> tuple[int, int]:
    """(width, height) as displayed (after EXIF orientation), read from the header without decoding.

    Raises:
        ImageDecodeError: empty or unreadable data, or a size outside `limits`.
    """
    width, height, transposed = _header(data, limits)
    return (height, width) if transposed else (width, height)


def _uniforms(key: str, count: int) -> np.ndarray:
    """`count` floats in [0, 1) from SHAKE-256 of `key`: the same on every machine, forever."""
    raw = np.frombuffer(hashlib.shake_256(key.encode()).digest(8 * count), dtype="<u8")
    return (raw >> 11).astype(np.float64) / float(1 << 53)


def center_view(width: int, height: int) -> View:
    """The largest central square."""
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return View((left, top, left + side, top + side))


def view_geometry(
    image_id: str,
    view: int,
    width: int,
    height: int,
    *,
    seed: int = 0,
    crop: Crop = "center",
    flip: bool = False,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> View:
    """The crop and flip of one view of an image, a pure function of its arguments.

    `crop="random"` follows RandomResizedCrop: area fraction uniform in `scale`, log-uniform aspect
    ratio in `ratio`, up to 10 tries, else the central square. `flip=True` mirrors with probability 1/2.
    """
    u = _uniforms(f"ltrp-view\0{seed}\0{view}\0{image_id}", 41)  # flip, then 4 per try
    mirrored = flip and bool(u[0] < 0.5)
    if crop == "center":
        return View(center_view(width, height).box, mirrored)
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for attempt in range(10):
        su, ru, xu, yu = u[1 + 4 * attempt : 5 + 4 * attempt]
        target = area * (scale[0] + (scale[1] - scale[0]) * su)
        aspect = math.exp(log_lo + (log_hi - log_lo) * ru)
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = math.floor(xu * (width - w + 1)), math.floor(yu * (height - h + 1))
            return View((float(left), float(top), float(left + w), float(top + h)), mirrored)
    return View(center_view(width, height).box, mirrored)


def render_views(
    data: bytes, views: Sequence[View], size: int, limits: ImageLimits = ImageLimits()
) -> list[np.ndarray]:
    """Encoded image bytes -> each view as (size, size, 3) uint8 RGB (bicubic resize of its crop box).

    JPEGs are decoded at the smallest power-of-two reduction that still gives the crop at least
    `size` pixels (draft mode); the box is rescaled to match, so any caller gets the same pixels.
    Views whose reduction coincides share one decode (other formats: one decode in all), and each
    view's pixels are those of `render_view` on it alone.

    Args:
        data: the encoded image (any format Pillow reads).
        views: crop boxes in displayed (EXIF-oriented) pixels, each with its mirror flag.
        size: the side of every output square, in pixels.
        limits: the image's accepted size, checked from its header before any decoding.

    Returns:
        One array per view, in the order of `views`.

    Raises:
        ImageDecodeError: unreadable, truncated or out-of-bounds image.
    """
    stored_w, stored_h, transposed = _header(data, limits)
    width, height = (stored_h, stored_w) if transposed else (stored_w, stored_h)
    decoded: dict[object, Image.Image] = {}  # draft's answer -> the displayed image decoded that way
    out = []
    try:
        for view in views:
            # Opening parses the header only; a drafted image is decoded once, on first need.
            with Image.open(io.BytesIO(data)) as img:
                # draft's answer (None, or the mode and the reduced image's extent) names the decode
                # it set up: equal answers give equal pixels, so those views share one decode.
                reduction = img.draft("RGB", _draft_size(view, size, width, height, transposed))
                if reduction not in decoded:
                    decoded[reduction] = _to_rgb(ImageOps.exif_transpose(img))
            out.append(_resize_box(decoded[reduction], view, size, width, height))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageDecodeError(f"cannot decode image: {err}") from None
    return out


def render_view(data: bytes, view: View, size: int, limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """One view of `render_views`: what the scoring job stored, replayed alone by training."""
    return render_views(data, [view], size, limits)[0]


def _draft_size(view: View, size: int, width: int, height: int, transposed: bool) -> tuple[int, int]:
    """The whole image's (stored, unoriented) size at which the view's box spans `size` pixels each way."""
    left, top, right, bottom = view.box
    need = (math.ceil(size * width / (right - left)), math.ceil(size * height / (bottom - top)))
    return need[::-1] if transposed else need


def _resize_box(img: Image.Image, view: View, size: int, width: int, height: int) -> np.ndarray:
    """The view cut from `img`, the displayed width x height image possibly reduced by draft mode."""
    sx, sy = img.width / width, img.height / height
    left, top, right, bottom = view.box
    box = (left * sx, top * sy, right * sx, bottom * sy)
    out = img.resize((size, size), Image.Resampling.BICUBIC, box=box)
    if view.flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(out)


def png_bytes(pixels: np.ndarray) -> bytes:
    """An image array (H, W) or (H, W, 3) uint8 encoded as PNG."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def center_crop(data: bytes, size: int, limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """Encoded image bytes -> its central square at (size, size, 3) uint8: the common view."""
    return render_view(data, center_view(*displayed_size(data, limits)), size, limits)


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
    import torch  # here: Ray Data's read and decode processes import this module but never need torch

    x = torch.as_tensor(batch).permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std
