"""Benchmark: rendering K views of each JPEG, today's `render_views` (one decode per image) against
other decoders, side by side in one run on one core.

    python -m jobs.bench.decode                         # 21 JPEGs, 8 views of 224 px, 3 rounds
    python -m jobs.bench.decode --images 64 --rounds 5

The corpus is JPEGs at ImageNet-like sizes (longer side 500 px, quality 90), cut at random from
scikit-image's colour photos; each image gets K random-crop + flip views (`view_geometry`). Per method:
views per second of this process's CPU time (one thread: views/s per core, and other processes on the
machine do not count), its ratio to today's `render_views`, and the max and mean absolute pixel
difference from it over all views (0: identical). The methods alternate within each round and
the median round is printed, so machine noise affects all alike. Optional decoders (simplejpeg,
OpenCV) are timed when installed and reported "not installed" otherwise. (A decode per view,
`render_view` on each view alone, was measured beside these until commit d29cc9d: docs/benchmarks.md.)
"""

from __future__ import annotations

import io
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import PIL
import torch
import torch.nn.functional as F
import tyro
from PIL import Image, features
from torchvision.io import ImageReadMode, decode_jpeg

from jobs.bench.jpegs import imagenet_sized_jpegs
from ltrp.data.images import View, displayed_size, render_views, view_geometry

COLOUR_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
)

#: The method the others are measured against: what the decode stage does.
TODAY = "render_views, one decode per reduction (today)"

#: (image bytes, its views, output side) -> one (side, side, 3) uint8 RGB array per view.
Method = Callable[[bytes, list[View], int], list[np.ndarray]]


@dataclass
class DecodeBenchConfig:
    """K views of each JPEG: today's one decode per image and other decoders, side by side."""

    images: int = 21  # JPEGs in the corpus (3 cuts of each photo)
    views: int = 8  # random-crop + flip views per image (K)
    size: int = 224  # output side, in pixels
    rounds: int = 3  # timed rounds, methods interleaved within each; the median is printed
    seed: int = 0


def _box(view: View) -> tuple[int, int, int, int]:
    """The view's box in whole pixels (random crops are whole already) for decoders that slice arrays."""
    left, top, right, bottom = (round(c) for c in view.box)
    return left, top, right, bottom


def torchvision_views(data: bytes, views: list[View], size: int) -> list[np.ndarray]:
    """torchvision's JPEG decoder once, then per view a tensor slice and antialiased bicubic resize."""
    image = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    out = []
    for view in views:
        left, top, right, bottom = _box(view)
        crop = image[None, :, top:bottom, left:right].float()
        pixels = F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        pixels = pixels[0].round_().clamp_(0, 255).to(torch.uint8)
        out.append((pixels.flip(-1) if view.flip else pixels).permute(1, 2, 0).numpy())
    return out


def _pillow_views(
    image: Image.Image, views: list[View], size: int, resample: Image.Resampling, reducing_gap: float | None
) -> list[np.ndarray]:
    """Per view, Pillow's resize of the box from one decoded image, then the mirror."""
    out = []
    for view in views:
        pixels = image.resize((size, size), resample, box=view.box, reducing_gap=reducing_gap)
        out.append(np.asarray(pixels.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if view.flip else pixels))
    return out


def _pillow_full(resample: Image.Resampling, reducing_gap: float | None = None) -> Method:
    """Pillow decodes the whole image once (no draft mode), then resizes with `resample`."""

    def method(data: bytes, views: list[View], size: int) -> list[np.ndarray]:
        with Image.open(io.BytesIO(data)) as img:
            return _pillow_views(img.convert("RGB"), views, size, resample, reducing_gap)

    return method


def _simplejpeg() -> Method | None:
    """simplejpeg's decoder (libjpeg-turbo) once, then Pillow's bicubic resize per view."""
    try:
        import simplejpeg
    except ImportError:
        return None

    def method(data: bytes, views: list[View], size: int) -> list[np.ndarray]:
        image = Image.fromarray(simplejpeg.decode_jpeg(data, colorspace="RGB"))
        return _pillow_views(image, views, size, Image.Resampling.BICUBIC, None)

    return method


def _opencv(interpolation_name: str) -> Method | None:
    """OpenCV's imdecode once (one thread), then per view an array slice and cv2.resize."""
    try:
        import cv2
    except ImportError:
        return None
    cv2.setNumThreads(1)
    interpolation = getattr(cv2, interpolation_name)

    def method(data: bytes, views: list[View], size: int) -> list[np.ndarray]:
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        image = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        out = []
        for view in views:
            left, top, right, bottom = _box(view)
            pixels = cv2.resize(image[top:bottom, left:right], (size, size), interpolation=interpolation)
            out.append(np.ascontiguousarray(pixels[:, ::-1]) if view.flip else pixels)
        return out

    return method


def methods() -> dict[str, Method | None]:
    """Every method by name, today's path first; None: its package is not installed."""
    return {
        TODAY: render_views,
        "torchvision decode_jpeg + interpolate bicubic aa": torchvision_views,
        "Pillow one full decode + BILINEAR": _pillow_full(Image.Resampling.BILINEAR),
        "Pillow one full decode + BICUBIC reducing_gap=1": _pillow_full(Image.Resampling.BICUBIC, 1.0),
        "simplejpeg decode + Pillow BICUBIC": _simplejpeg(),
        "OpenCV imdecode + resize INTER_AREA": _opencv("INTER_AREA"),
        "OpenCV imdecode + resize INTER_CUBIC": _opencv("INTER_CUBIC"),
    }


def cpu_seconds(method: Method, work: list[tuple[bytes, list[View]]], size: int) -> float:
    """This process's CPU time (all its threads) to render every view of every image."""
    start = time.process_time()
    for data, views in work:
        method(data, views, size)
    return time.process_time() - start


def differences(
    method: Method, work: list[tuple[bytes, list[View]]], size: int, today: list[np.ndarray]
) -> tuple[int, float]:
    """(max, mean) absolute pixel difference from `today`'s views (today's path), over all views."""
    got = [pixels for data, views in work for pixels in method(data, views, size)]
    diffs = np.abs(np.stack(got).astype(np.int16) - np.stack(today).astype(np.int16))
    return int(diffs.max()), float(diffs.mean())


def main(argv: list[str] | None = None) -> None:
    cfg = tyro.cli(DecodeBenchConfig, args=argv, prog="python -m jobs.bench.decode", description=__doc__)
    torch.set_num_threads(1)
    corpus = list(imagenet_sized_jpegs(cfg.images, COLOUR_PHOTOS, cfg.seed))
    work = []
    for i, data in enumerate(corpus):
        width, height = displayed_size(data)
        views = [
            view_geometry(str(i), v, width, height, seed=cfg.seed, crop="random", flip=True)
            for v in range(cfg.views)
        ]
        work.append((data, views))
    total = cfg.images * cfg.views
    print(
        f"Pillow {PIL.__version__} (libjpeg-turbo: {features.check_feature('libjpeg_turbo')}), "
        f"torch {torch.__version__} ({torch.get_num_threads()} thread); {cfg.images} JPEGs of about "
        f"500 x 375 px, quality 90; {cfg.views} random-crop + flip views of {cfg.size} px each",
        flush=True,
    )
    available = {name: m for name, m in methods().items() if m is not None}
    for method in available.values():
        cpu_seconds(method, work[:1], cfg.size)  # warm-up: imports, allocator, first-call setup
    timings: dict[str, list[float]] = {name: [] for name in available}
    for _ in range(cfg.rounds):
        for name, method in available.items():
            timings[name].append(total / cpu_seconds(method, work, cfg.size))
    today = statistics.median(timings[TODAY])
    reference = [pixels for data, views in work for pixels in render_views(data, views, cfg.size)]
    width = max(len(name) for name in methods())
    for name, method in methods().items():
        if method is None:
            print(f"decode {name:<{width}}  not installed", flush=True)
            continue
        speed = statistics.median(timings[name])
        worst, mean = differences(method, work, cfg.size, reference)
        print(
            f"decode {name:<{width}}  {speed:7.1f} views/s per core  {speed / today:5.2f}x today  "
            f"pixel diff vs today: max {worst:3d}, mean {mean:.4f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
