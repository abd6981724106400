"""Multi-object scenes with known ground truth: Fashion-MNIST objects on mixed backgrounds.

A scene is a 56 x 56 RGB canvas, so 4-px patches give the paper's geometry (a 14 x 14 grid, 196
patches; mask ratio 0.9 leaves 19 visible). It holds 1-4 tinted Fashion-MNIST objects at random scale
and position, on a background of one kind: black, a low-contrast texture, non-object clutter (strokes
and blobs), a dimmed crop of a natural photograph taken where the photo holds no object, distractor
shapes at object scale (polygons, ellipses, glyphs) that belong to no class, or a texture under faint,
low-contrast objects (docs/scenes.md says why each is there). Each scene is a pure function of
(config, split, index): the train split takes its objects from Fashion-MNIST's train images, the test
split from its test images. Per object we know its class, box and visible pixel mask, so a patch
selector can be judged by how much of each object it keeps.

`write_scenes` writes a corpus the scoring job reads: PNG files plus a Parquet manifest, documented
in docs/scenes.md (any labelled scene corpus with masks in that format works with the evaluation).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import get_args

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import skimage.data
from PIL import Image, ImageDraw

from ltrp.core.options import Background, Split
from ltrp.data.datasets import FASHION_MNIST_CLASSES, read_fashion_mnist

BACKGROUNDS: tuple[str, ...] = get_args(Background)
#: scikit-image's bundled grey textures and photos (installed with it, nothing to download).
TEXTURES = ("brick", "grass", "gravel")
#: Photo -> the boxes (left, top, right, bottom; source pixels) its crops are cut from. Object recall
#: counts every pixel outside the Fashion-MNIST masks as background, so a crop must hold no object a
#: selector should keep: each box was checked by eye to hold none. Photos that are mostly objects
#: (astronaut, chelsea, coins, hubble_deep_field's galaxies) are left out.
PHOTO_REGIONS: dict[str, tuple[tuple[int, int, int, int], ...]] = {
    # the sky right of the man's head; the grass right of the tripod
    "camera": ((270, 0, 512, 105), (410, 260, 512, 512)),
    # the wooden table right of, above and left of the saucer
    "coffee": ((490, 0, 600, 400), (440, 0, 600, 95), (0, 110, 70, 400)),
    # the sky above the rocket and masts, and on either side of the rocket, between the masts
    "rocket": ((95, 0, 555, 118), (210, 0, 300, 340), (345, 0, 432, 340)),
    # stained tissue (glands in stroma): a texture throughout
    "immunohistochemistry": ((0, 0, 512, 512),),
    # pitted ground, off the large crater, the bright ridge and the dark crater field
    "moon": ((0, 200, 200, 512), (360, 200, 512, 512)),
    # the noisy ground above, below and left of the one cell and its dark halo
    "cell": ((0, 0, 550, 250), (0, 480, 550, 660), (0, 0, 320, 660)),
}
PHOTOS = tuple(PHOTO_REGIONS)
PHOTO_SIDE = 512  # a folder photo's short side after scaling (scikit-image's photos are ~512 px)
_SPLIT_CODES = {"train": 0, "test": 1}
#: The bias test's groups: classes a supervised selector is trained on, and classes it never sees.
#: Look-alikes stay together (Shirt with T-shirt; Sandal, Sneaker, Ankle boot together).
SEEN_CLASSES = ("T-shirt_top", "Pullover", "Coat", "Shirt", "Dress", "Trouser")
UNSEEN_CLASSES = ("Sandal", "Sneaker", "Ankle_boot", "Bag")
#: The judge that ships with the package: an MAE pre-trained on scenes, chosen by its oracle's object
#: recall on held-out scenes (fp16; how it was made and chosen: weights/README.md).
SHIPPED_MAE = Path(__file__).parent / "weights" / "mae_vit_scenes_v2_patch4.pth"
#: The first shipped MAE, kept for comparison (a pipeline takes it as data.mae: FILE).
FIRST_MAE = SHIPPED_MAE.with_name("mae_vit_scenes_patch4.pth")


@dataclass(frozen=True)
class SceneConfig:
    """How scenes are drawn. Every field changes the scenes, so a corpus records all of them."""

    size: int = 56  # canvas side in pixels (56 with 4-px patches: a 14 x 14 grid)
    min_objects: int = 1
    max_objects: int = 4
    min_scale: int = 16  # object side in pixels, drawn uniformly in [min_scale, max_scale]
    max_scale: int = 30
    max_overlap: float = 0.25  # at most this fraction of a new object's box may cover earlier boxes
    #: background kind -> weight of its draw (normalised); a kind of weight 0 never occurs
    backgrounds: Mapping[str, float] = field(
        default_factory=lambda: {"black": 1.0, "texture": 1.0, "clutter": 1.0, "photo": 1.0}
    )
    photo_dim: float = 0.55  # photo crops are multiplied by this, so objects stay visible on them
    #: a folder of photographs the photo kind crops anywhere in, instead of scikit-image's object-free
    #: regions: for pre-training corpora (object masks do not mark what those photos hold)
    photo_folder: str = ""
    #: on "faint" scenes an object's colour keeps this share of its difference from the mean background
    #: under its box: its outline's gradient falls from ~14x the texture's to ~2x (docs/scenes.md)
    faint_contrast: float = 0.15
    #: class-name groups each scene must hold an object of (the bias test set: one seen, one unseen)
    require: tuple[tuple[str, ...], ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = set(self.backgrounds) - set(BACKGROUNDS)
        if unknown:
            raise ValueError(f"backgrounds: unknown kind(s) {sorted(unknown)}; choose from {BACKGROUNDS}")
        if not any(w > 0 for w in self.backgrounds.values()) or any(w < 0 for w in self.backgrounds.values()):
            raise ValueError(f"backgrounds: weights must be >= 0 with one > 0, got {dict(self.backgrounds)}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(
                f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}"
            )
        unknown = {c for group in self.require for c in group} - set(FASHION_MNIST_CLASSES)
        if unknown:
            raise ValueError(
                f"require: unknown class(es) {sorted(unknown)}; classes: {FASHION_MNIST_CLASSES}"
            )
        if len(self.require) > self.max_objects:
            raise ValueError(
                f"require names {len(self.require)} groups but max_objects is {self.max_objects}"
            )
        if self.photo_folder and not folder_photos(self.photo_folder):
            raise ValueError(f"photo_folder: no .jpg or .png image in {self.photo_folder}")
        if not 0 < self.faint_contrast <= 1:
            raise ValueError(f"need 0 < faint_contrast <= 1, got {self.faint_contrast}")
        if not 4 <= self.min_scale <= self.max_scale <= self.size:
            raise ValueError(
                f"need 4 <= min_scale <= max_scale <= size, got {self.min_scale}, {self.max_scale}"
            )


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene: its Fashion-MNIST class and source image, box and visible pixels."""

    label: int  # Fashion-MNIST class index
    source_index: int  # index of the object's image in its Fashion-MNIST split
    box: tuple[int, int, int, int]  # (left, top, right, bottom), pixels, right/bottom exclusive
    mask: np.ndarray  # (size, size) bool: the object's pixels that no later object covers

    @property
    def name(self) -> str:
        return FASHION_MNIST_CLASSES[self.label]


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # (size, size, 3) uint8
    background: str
    objects: tuple[SceneObject, ...]

    @property
    def labels(self) -> list[str]:
        """The classes present, sorted, each once (the scene's multi-label)."""
        return sorted({o.name for o in self.objects})


def make_scene(cfg: SceneConfig, split: Split, index: int) -> Scene:
    """The scene `index` of `split`: the same on every call, process and machine."""
    rng = np.random.default_rng([cfg.seed, _SPLIT_CODES[split], index])
    background, canvas = _draw_background(rng, cfg)
    ground = canvas.copy()  # the background alone: faint objects take their contrast against it
    images, labels = _fashion_mnist(split)
    boxes: list[tuple[int, int, int, int]] = []
    placed: list[tuple[int, np.ndarray]] = []  # (source index, alpha on the canvas)
    count = max(int(rng.integers(cfg.min_objects, cfg.max_objects + 1)), len(cfg.require))
    for k in range(count):
        side = int(rng.integers(cfg.min_scale, cfg.max_scale + 1))
        box = _place(rng, cfg, side, boxes)
        while box is None and k < len(cfg.require) and side > cfg.min_scale:  # a required one: smaller
            side -= 2
            box = _place(rng, cfg, max(side, cfg.min_scale), boxes)
        if box is None:  # no room left within the overlap bound: the scene keeps fewer objects
            if k < len(cfg.require):
                raise RuntimeError(f"scene {split} {index}: no room for an object of {cfg.require[k]}")
            continue
        if k < len(cfg.require):  # the required groups' objects come first, on the emptiest canvas
            candidates = _class_members(split, cfg.require[k])
            source = int(candidates[rng.integers(len(candidates))])
        else:
            source = int(rng.integers(len(images)))
        tint = _bright_colour(rng)
        alpha, colour = _object_layer(images[source], side, tint)
        left, top, right, bottom = box
        if background == "faint":
            colour = _faint(colour, ground[top:bottom, left:right], cfg.faint_contrast)
        region = canvas[top:bottom, left:right]
        region[:] = (alpha[..., None] * colour + (1 - alpha[..., None]) * region).round()
        full = np.zeros((cfg.size, cfg.size), dtype=np.float32)
        full[top:bottom, left:right] = alpha
        boxes.append(box)
        placed.append((source, full))
    objects = []
    covered = np.zeros((cfg.size, cfg.size), dtype=bool)
    for (source, alpha), box in reversed(list(zip(placed, boxes, strict=True))):  # the top object first
        mask = (alpha > 0.5) & ~covered
        covered |= alpha > 0.5
        objects.append(SceneObject(int(labels[source]), source, box, mask))
    return Scene(canvas.astype(np.uint8), background, tuple(reversed(objects)))


def scene_background(cfg: SceneConfig, split: Split, index: int) -> np.ndarray:
    """The canvas of scene `index` before its objects are drawn: (size, size, 3) float32, distractors
    included. Where no object's box reaches, the scene's pixels are these values rounded down."""
    rng = np.random.default_rng([cfg.seed, _SPLIT_CODES[split], index])
    return _draw_background(rng, cfg)[1]


def _draw_background(rng: np.random.Generator, cfg: SceneConfig) -> tuple[str, np.ndarray]:
    """The scene's background kind, drawn by the weights, and its canvas: the first draws of a scene."""
    kinds = [k for k in BACKGROUNDS if cfg.backgrounds.get(k, 0) > 0]
    weights = np.array([cfg.backgrounds[k] for k in kinds], dtype=float)
    background = kinds[rng.choice(len(kinds), p=weights / weights.sum())]
    return background, _BACKGROUND_MAKERS[background](rng, cfg)


def _place(
    rng: np.random.Generator, cfg: SceneConfig, side: int, boxes: list[tuple[int, int, int, int]]
) -> tuple[int, int, int, int] | None:
    for _ in range(20):
        left, top = (int(v) for v in rng.integers(0, cfg.size - side + 1, size=2))
        box = (left, top, left + side, top + side)
        together = [*boxes, box]
        # Bounded both ways: no box, earlier or new, is covered beyond max_overlap by the others.
        if all(
            _covered_fraction(b, together[:i] + together[i + 1 :]) <= cfg.max_overlap
            for i, b in enumerate(together)
        ):
            return box
    return None


def _covered_fraction(box: tuple[int, int, int, int], others: list[tuple[int, int, int, int]]) -> float:
    """The fraction of `box`'s area that lies inside any of `others`."""
    left, top, right, bottom = box
    inside = np.zeros((bottom - top, right - left), dtype=bool)
    for ol, ot, orr, ob in others:
        inside[
            max(ot, top) - top : max(min(ob, bottom) - top, 0),
            max(ol, left) - left : max(min(orr, right) - left, 0),
        ] = True
    return float(inside.mean())


def _object_layer(source: np.ndarray, side: int, tint: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A 28 x 28 Fashion-MNIST image at `side` px -> (alpha (side, side), colour (side, side, 3)).
    Opaque where the garment is (its grey level is its shape, not its colour); shaded by its texture."""
    grey = np.asarray(Image.fromarray(source).resize((side, side), Image.BILINEAR), dtype=np.float32) / 255
    alpha = np.clip(grey / 0.15, 0, 1)  # Fashion-MNIST's background is 0; faint edges fade in
    shade = 0.45 + 0.55 * grey  # keeps the garment's own texture, never black
    return alpha, shade[..., None] * tint


def _faint(colour: np.ndarray, ground: np.ndarray, contrast: float) -> np.ndarray:
    """An object's colour pulled towards the mean of the background under it, keeping `contrast` of
    the difference: still opaque (its mask is unchanged), but its outline barely stronger than the
    texture's own edges."""
    mean = ground.mean(axis=(0, 1))
    return mean + contrast * (colour - mean)


def _bright_colour(rng: np.random.Generator) -> np.ndarray:
    """A saturated, bright RGB tint in [0, 255]: one channel high, the others anywhere."""
    colour = rng.uniform(40, 255, size=3)
    colour[rng.integers(3)] = 255
    return colour.astype(np.float32)


def _black(rng: np.random.Generator, cfg: SceneConfig) -> np.ndarray:
    return np.zeros((cfg.size, cfg.size, 3), dtype=np.float32)


def _texture(rng: np.random.Generator, cfg: SceneConfig) -> np.ndarray:
    """A crop of a grey texture at a random scale, contrast-scaled low and tinted."""
    grey = _random_crop(rng, _texture_image(TEXTURES[rng.integers(len(TEXTURES))]), cfg.size)[..., 0]
    contrast = rng.uniform(0.15, 0.35)
    level = rng.uniform(40, 110)
    values = level + contrast * (grey - grey.mean())
    tint = rng.uniform(0.5, 1.0, size=3)
    return np.clip(values[..., None] * tint, 0, 255).astype(np.float32)


def _clutter(rng: np.random.Generator, cfg: SceneConfig) -> np.ndarray:
    """Random strokes and blobs in muted colours on a dark ground: edges that belong to no object."""
    ground = tuple(int(v) for v in rng.uniform(0, 60, size=3))
    image = Image.new("RGB", (cfg.size, cfg.size), ground)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(3, 9)):
        colour = tuple(int(v) for v in rng.uniform(30, 150, size=3))
        x0, y0, x1, y1 = (int(v) for v in rng.integers(0, cfg.size, size=4))
        if rng.random() < 0.5:
            draw.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(1, 4)))
        else:
            r = int(rng.integers(2, 7))
            draw.ellipse((x0 - r, y0 - r, x0 + r, y0 + r), fill=colour)
    return np.asarray(image, dtype=np.float32)


def _photo(rng: np.random.Generator, cfg: SceneConfig) -> np.ndarray:
    """A crop of a natural photograph at a random scale, from one of its object-free regions
    (`PHOTO_REGIONS`), or from anywhere in a photo of `photo_folder`, dimmed by `photo_dim`."""
    if cfg.photo_folder:
        photos = folder_photos(cfg.photo_folder)
        photo = _random_crop(rng, _folder_photo(photos[rng.integers(len(photos))]), cfg.size)
        return photo * cfg.photo_dim
    name = PHOTOS[rng.integers(len(PHOTOS))]
    regions = PHOTO_REGIONS[name]
    left, top, right, bottom = regions[rng.integers(len(regions))]
    photo = _random_crop(rng, _photo_image(name)[top:bottom, left:right], cfg.size)
    return photo * cfg.photo_dim


def _shapes(rng: np.random.Generator, cfg: SceneConfig) -> np.ndarray:
    """2-5 distractors on a dark ground: polygons, ellipses and glyphs, filled or outlined, at the
    objects' scale and tinted and shaded as objects are, so their edges look like objects' edges; they
    belong to no class and have no mask (they are background). Objects are drawn over them."""
    canvas = np.empty((cfg.size, cfg.size, 3), dtype=np.float32)
    canvas[:] = rng.uniform(0, 40, size=3)  # flat, like black's: only the distractors add edges
    for _ in range(int(rng.integers(2, 6))):
        side = int(rng.integers(cfg.min_scale, cfg.max_scale + 1))
        alpha = _distractor_alpha(rng, side)
        colour = _smooth_shade(rng, side)[..., None] * _bright_colour(rng)
        left, top = (int(v) for v in rng.integers(0, cfg.size - side + 1, size=2))
        region = canvas[top : top + side, left : left + side]
        region[:] = (alpha[..., None] * colour + (1 - alpha[..., None]) * region).round()
    return canvas


def _faint_objects(rng: np.random.Generator, cfg: SceneConfig) -> np.ndarray:
    """The texture kind's background; make_scene draws the objects on it at `faint_contrast`."""
    return _texture(rng, cfg)


_BACKGROUND_MAKERS = {
    "black": _black,
    "texture": _texture,
    "clutter": _clutter,
    "photo": _photo,
    "shapes": _shapes,
    "faint": _faint_objects,
}

#: Distractor outlines are drawn this many times larger, then box-filtered down: soft edges 1-2 px
#: wide, as the objects' bilinear resize gives theirs (hard-edged shapes would be easy to tell apart).
_SUPERSAMPLE = 4
#: Glyphs as strokes in a unit box (x right, y down): letter-like edges, no Fashion-MNIST class, and no
#: font file (a font could draw differently on another machine or Pillow version).
_GLYPHS: tuple[tuple[tuple[tuple[float, float], ...], ...], ...] = (
    (((0, 1), (0.5, 0), (1, 1)), ((0.2, 0.6), (0.8, 0.6))),  # A
    (((1, 0), (0, 0), (0, 1), (1, 1)), ((0, 0.5), (0.75, 0.5))),  # E
    (((0, 0), (0, 1)), ((1, 0), (1, 1)), ((0, 0.5), (1, 0.5))),  # H
    (((0, 0), (0, 1)), ((1, 0), (0, 0.55), (1, 1))),  # K
    (((0, 1), (0, 0), (0.5, 0.6), (1, 0), (1, 1)),),  # M
    (((0, 1), (0, 0), (1, 1), (1, 0)),),  # N
    (((0, 0), (1, 0)), ((0.5, 0), (0.5, 1))),  # T
    (((0, 0), (0.25, 1), (0.5, 0.4), (0.75, 1), (1, 0)),),  # W
    (((0, 0), (1, 1)), ((1, 0), (0, 1))),  # X
    (((0, 0), (0.5, 0.5), (1, 0)), ((0.5, 0.5), (0.5, 1))),  # Y
    (((0, 0), (1, 0), (0, 1), (1, 1)),),  # Z
    (((0.7, 1), (0.7, 0), (0, 0.65), (1, 0.65)),),  # 4
)


def _distractor_alpha(rng: np.random.Generator, side: int) -> np.ndarray:
    """One distractor's opacity, (side, side) float32 in [0, 1], spanning most of its box: a polygon,
    an ellipse (each filled or outlined) or a glyph, with strokes 2-3 px wide."""
    big = side * _SUPERSAMPLE
    image = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(image)
    width = int(rng.integers(2, 4)) * _SUPERSAMPLE
    kind = int(rng.integers(5))
    if kind < 2:  # a polygon, filled or outlined
        points = _polygon(rng, big, width)
        if kind == 0:
            draw.polygon(points, fill=255)
        else:
            draw.line([*points, points[0]], fill=255, width=width, joint="curve")
    elif kind < 4:  # an ellipse, filled or a ring
        radii = (big - width) / 2 * np.array([1.0, rng.uniform(0.5, 1.0)])
        rx, ry = rng.permutation(radii)  # one axis spans the box, the other half of it or more
        box = (big / 2 - rx, big / 2 - ry, big / 2 + rx, big / 2 + ry)
        draw.ellipse(box, fill=255 if kind == 2 else None, outline=255, width=width)
    else:
        for stroke in _glyph(rng, big, width):
            draw.line(stroke, fill=255, width=width, joint="curve")
    return np.asarray(image.resize((side, side), Image.BOX), dtype=np.float32) / 255


def _polygon(rng: np.random.Generator, big: int, width: int) -> list[tuple[float, float]]:
    """3-7 vertices around the box's centre, evenly spread in angle with jitter and at 75-100% of the
    box's half-side from it: never a sliver, never much smaller than the box."""
    count = int(rng.integers(3, 8))
    angles = (
        rng.uniform(0, 2 * np.pi) + 2 * np.pi * (np.arange(count) + rng.uniform(-0.3, 0.3, count)) / count
    )
    radii = (big - width) / 2 * rng.uniform(0.75, 1.0, count)
    return [(big / 2 + r * np.cos(a), big / 2 + r * np.sin(a)) for r, a in zip(radii, angles, strict=True)]


def _glyph(rng: np.random.Generator, big: int, width: int) -> list[list[tuple[float, float]]]:
    """A random glyph's strokes in pixels: full height, 60-100% of the box wide, centred."""
    strokes = _GLYPHS[rng.integers(len(_GLYPHS))]
    margin = width / 2 + 1
    glyph_width = (big - 2 * margin) * rng.uniform(0.6, 1.0)
    left = (big - glyph_width) / 2
    return [
        [(left + x * glyph_width, margin + y * (big - 2 * margin)) for x, y in stroke] for stroke in strokes
    ]


def _smooth_shade(rng: np.random.Generator, side: int) -> np.ndarray:
    """A slowly varying shade in [0.45, 1], (side, side): the objects' shades span that range too, so a
    distractor's inside is no flatter than a garment's."""
    coarse = Image.fromarray(rng.uniform(0.45, 1.0, size=(3, 3)).astype(np.float32))
    return np.asarray(coarse.resize((side, side), Image.BILINEAR), dtype=np.float32)


def _random_crop(rng: np.random.Generator, image: np.ndarray, size: int) -> np.ndarray:
    """A square crop of side between `size` and the image's short side, resized to `size` px: float32
    (size, size, C)."""
    height, width = image.shape[:2]
    side = int(rng.integers(size, min(height, width) + 1))
    top, left = int(rng.integers(height - side + 1)), int(rng.integers(width - side + 1))
    crop = Image.fromarray(image[top : top + side, left : left + side]).resize((size, size), Image.BILINEAR)
    out = np.asarray(crop, dtype=np.float32)
    return out if out.ndim == 3 else out[..., None]


@functools.cache
def _texture_image(name: str) -> np.ndarray:
    return getattr(skimage.data, name)()


@functools.cache
def _photo_image(name: str) -> np.ndarray:
    image = getattr(skimage.data, name)()
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]


@functools.cache
def folder_photos(folder: str) -> tuple[str, ...]:
    """The .jpg and .png files of `folder` (none if it is not a folder), sorted: a scene's draw indexes
    into this order."""
    if not Path(folder).is_dir():
        return ()
    suffixes = {".jpg", ".jpeg", ".png"}
    return tuple(sorted(str(p) for p in Path(folder).iterdir() if p.suffix.lower() in suffixes))


@functools.cache
def _folder_photo(path: str) -> np.ndarray:
    """A photo of a folder as (H, W, 3) uint8, its short side scaled to `PHOTO_SIDE`: crops then span the
    scales they span on scikit-image's ~512-px photos, whatever the file's resolution."""
    image = Image.open(path).convert("RGB")
    scale = PHOTO_SIDE / min(image.size)
    return np.asarray(image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR))


@functools.cache
def _fashion_mnist(split: Split) -> tuple[np.ndarray, np.ndarray]:
    return read_fashion_mnist(split)


@functools.cache
def _class_members(split: Split, classes: tuple[str, ...]) -> np.ndarray:
    """Indices of the split's images whose class is one of `classes`."""
    wanted = [FASHION_MNIST_CLASSES.index(c) for c in classes]
    return np.flatnonzero(np.isin(_fashion_mnist(split)[1], wanted))


#: The manifest's columns (docs/scenes.md). The scoring job reads uri, image_id and label; the
#: evaluation reads the objects.
OBJECT_TYPE = pa.struct(
    [
        ("label", pa.string()),  # class name
        ("box", pa.list_(pa.int32(), 4)),  # left, top, right, bottom (pixels, right/bottom exclusive)
        ("mask", pa.binary()),  # np.packbits of the (height, width) bool mask, row-major
    ]
)
MANIFEST_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("uri", pa.string()),  # relative to the manifest's folder
        ("label", pa.string()),  # the classes present, sorted, joined by "+"
        ("labels", pa.list_(pa.string())),  # the same, as a list
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("background", pa.string()),
        ("objects", pa.list_(OBJECT_TYPE)),
    ]
)
MANIFEST = "manifest.parquet"


def write_scenes(folder: Path, split: Split, count: int, cfg: SceneConfig = SceneConfig()) -> Path:
    """Writes scenes 0..count-1 of `split` as FOLDER/images/NNNNNN.png and FOLDER/manifest.parquet
    (over any files of those names: a folder written with other settings holds other scenes). Returns
    the manifest's path."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        scene = make_scene(cfg, split, index)
        uri = f"images/{index:06d}.png"
        Image.fromarray(scene.image).save(folder / uri)
        rows.append(_manifest_row(f"{split}-{index:06d}", uri, scene))
    metadata = {"ltrp_scenes": _describe(cfg, split, count)}
    pq.write_table(
        pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA.with_metadata(metadata)), folder / MANIFEST
    )
    return folder / MANIFEST


def _manifest_row(image_id: str, uri: str, scene: Scene) -> dict:
    height, width = scene.image.shape[:2]
    return {
        "image_id": image_id,
        "uri": uri,
        "label": "+".join(scene.labels),
        "labels": scene.labels,
        "height": height,
        "width": width,
        "background": scene.background,
        "objects": [
            {"label": o.name, "box": list(o.box), "mask": np.packbits(o.mask).tobytes()}
            for o in scene.objects
        ],
    }


def _describe(cfg: SceneConfig, split: str, count: int) -> str:
    return json.dumps(
        {**asdict(cfg), "backgrounds": dict(cfg.backgrounds), "split": split, "count": count}, default=list
    )


def read_object_masks(manifest: str | Path) -> dict[str, list[tuple[str, np.ndarray]]]:
    """image_id -> [(class name, (height, width) bool mask), ...] from a scene manifest."""
    table = pq.read_table(manifest, columns=["image_id", "height", "width", "objects"])
    out = {}
    for image_id, height, width, objects in zip(
        *(table.column(c).to_pylist() for c in table.column_names), strict=True
    ):
        out[image_id] = [(o["label"], unpack_mask(o["mask"], height, width)) for o in objects]
    return out


def unpack_mask(packed: bytes, height: int, width: int) -> np.ndarray:
    """A manifest's `objects.mask` -> (height, width) bool."""
    return (
        np.unpackbits(np.frombuffer(packed, np.uint8), count=height * width)
        .reshape(height, width)
        .astype(bool)
    )
