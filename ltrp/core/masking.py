"""Deterministic visible sets: which patches the MAE sees, as a pure function of (seed, image id, view)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch


def visible_count(num_patches: int, mask_ratio: float) -> int:
    """n = int(L * (1 - mask_ratio)), MAE's formula: 19 (not 20) for L = 196 at 0.9, because of floats."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    n = int(num_patches * (1 - mask_ratio))
    if n < 1:
        raise ValueError(f"mask_ratio {mask_ratio} leaves no visible patch out of {num_patches}")
    return n


def _visible_set(image_id: str, num_patches: int, n: int, seed: int, view: int) -> np.ndarray:
    # One SHAKE-256 stream per (seed, view, image id) gives a 64-bit key per patch; the n smallest keys
    # are a uniform random subset. Unlike an RNG's stream, this is fixed forever on every machine.
    key = f"ltrp-visible\0{seed}\0{view}\0{image_id}".encode()
    keys = np.frombuffer(hashlib.shake_256(key).digest(8 * num_patches), dtype="<u8")
    return np.sort(np.argsort(keys, kind="stable")[:n])


def visible_sets(
    image_ids: Sequence[str | int], *, grid: int, mask_ratio: float = 0.9, seed: int = 0, view: int = 0
) -> torch.Tensor:
    """Visible patch indices for each image, independent of batch order, batch size and machine.

    Args:
        image_ids: one id per image (ints are used through `str`, so 7 and "7" are the same image).
        grid: patches per side G; L = G*G.
        mask_ratio: fraction of patches hidden from the MAE.
        seed: run-level seed.
        view: view number of the image (each view of an image gets its own set).

    Returns:
        visible: (B, n) int64, each row sorted ascending, n = int(L * (1 - mask_ratio)).
    """
    num_patches = grid * grid
    n = visible_count(num_patches, mask_ratio)
    rows = [_visible_set(str(i), num_patches, n, seed, view) for i in image_ids]
    return torch.from_numpy(np.stack(rows)).long() if rows else torch.empty(0, n, dtype=torch.long)


def cover_sets(
    image_id: str | int, *, grid: int, mask_ratio: float = 0.9, seed: int = 0, rounds: int = 1
) -> torch.Tensor:
    """Visible sets that score every patch of an image: the full-coverage oracle's draws.

    Each round splits all L patches, in a permutation seeded by (seed, round, image id), into
    ceil(L / n) disjoint sets of n; the last one is topped up from the start of the permutation. So
    every patch is in at least `rounds` sets (those topped up in one more).

    Returns:
        visible: (rounds * ceil(L / n), n) int64, each row sorted ascending; round r's sets are the rows
        r * ceil(L / n) onwards.
    """
    num_patches = grid * grid
    n = visible_count(num_patches, mask_ratio)
    rows = []
    for round_ in range(rounds):
        key = f"ltrp-cover\0{seed}\0{round_}\0{image_id}".encode()
        keys = np.frombuffer(hashlib.shake_256(key).digest(8 * num_patches), dtype="<u8")
        order = np.argsort(keys, kind="stable")
        padded = np.concatenate([order, order[: -num_patches % n]])  # tops up the last set
        rows += [np.sort(chunk) for chunk in padded.reshape(-1, n)]
    return torch.from_numpy(np.stack(rows)).long()
