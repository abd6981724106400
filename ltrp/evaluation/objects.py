"""Does a selector keep the objects? Measures on images whose object masks are known (scenes).

Per image and keep set (the patches a selector keeps):
- object recall: the fraction of each object's pixels that lie in kept patches (an object cut by a
  patch edge counts only its pixels inside kept patches), averaged over the image's objects;
- seen / unseen recall: the same over the objects of the seen classes only, or of the unseen ones;
  their difference is the image's bias gap (positive: the selector keeps seen classes better);
- background share: the fraction of kept patches that hold no object pixel.
Every measure is one number per image, so selectors compare pairwise on the same images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ImageObjects:
    """One image's objects: their classes and, per object, its pixel count in each patch."""

    classes: tuple[str, ...]  # (m,)
    pixels: np.ndarray  # (m, L) object pixels per patch, raster order

    @classmethod
    def from_masks(cls, objects: Sequence[tuple[str, np.ndarray]], patch_size: int) -> ImageObjects:
        """objects: [(class, (H, W) bool mask), ...] of an image cut into patch_size squares."""
        counts = [_per_patch(mask, patch_size) for _, mask in objects]
        return cls(tuple(name for name, _ in objects), np.stack(counts) if counts else np.zeros((0, 0)))


def _per_patch(mask: np.ndarray, p: int) -> np.ndarray:
    """(H, W) bool -> (L,) pixels of the mask in each p x p patch, raster order."""
    h, w = mask.shape
    return mask.reshape(h // p, p, w // p, p).sum(axis=(1, 3)).ravel().astype(np.float64)


def object_recalls(objects: ImageObjects, keep: np.ndarray) -> np.ndarray:
    """(m,) the fraction of each object's pixels inside the kept patches `keep` (k,)."""
    total = objects.pixels.sum(axis=1)
    return objects.pixels[:, keep].sum(axis=1) / np.maximum(total, 1)


def background_share(objects: ImageObjects, keep: np.ndarray) -> float:
    """The fraction of kept patches with no object pixel."""
    occupied = objects.pixels.sum(axis=0) > 0
    return float(1.0 - occupied[keep].mean())


@dataclass(frozen=True)
class ObjectMeasures:
    """Per-image measures of one selector at one keep ratio, over N images (NaN: no such object)."""

    recall: np.ndarray  # (N,) mean recall of the image's objects
    seen_recall: np.ndarray  # (N,) over its seen-class objects
    unseen_recall: np.ndarray  # (N,) over its unseen-class objects
    background_share: np.ndarray  # (N,)
    class_recalls: dict[str, list[float]]  # class -> recall of every object of it, over the images

    @property
    def bias_gap(self) -> np.ndarray:
        """(N,) seen minus unseen recall, per image (NaN where an image lacks either group)."""
        return self.seen_recall - self.unseen_recall


def measure(
    images: Sequence[ImageObjects], keeps: np.ndarray, seen: Sequence[str], unseen: Sequence[str]
) -> ObjectMeasures:
    """Object measures of keep sets `keeps` (N, k) on `images` (N of them)."""
    recall, seen_recall, unseen_recall, share = [], [], [], []
    by_class: dict[str, list[float]] = {}
    for objects, keep in zip(images, keeps, strict=True):
        r = object_recalls(objects, keep)
        names = np.asarray(objects.classes)
        recall.append(r.mean() if len(r) else np.nan)
        seen_recall.append(_mean(r[np.isin(names, seen)]))
        unseen_recall.append(_mean(r[np.isin(names, unseen)]))
        share.append(background_share(objects, keep))
        for name, value in zip(objects.classes, r, strict=True):
            by_class.setdefault(name, []).append(float(value))
    return ObjectMeasures(
        np.asarray(recall), np.asarray(seen_recall), np.asarray(unseen_recall), np.asarray(share), by_class
    )


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if len(values) else np.nan


def difference_in_differences(selector: ObjectMeasures, reference: ObjectMeasures) -> np.ndarray:
    """(N,) per image: the selector's bias gap minus the reference's (random's, whose gap is ~0 by
    construction), on the images that hold both groups. Positive: the selector favours seen classes
    more than the reference does."""
    did = selector.bias_gap - reference.bias_gap
    return did[~np.isnan(did)]
