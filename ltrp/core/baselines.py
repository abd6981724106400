"""Patch scorers behind one interface, for comparing selectors: images -> (B, L) scores, higher = keep.

images are (B, C, S, S) float tensors (normalised as the models expect); patches are the p x p squares
of the S/p x S/p grid, raster order. Training-free baselines (random, center prior, patch variance,
gradient energy, FOLK's RCom residual energy, stratified random) and the LTRP ranker share the interface.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ltrp.core.folk import frequency_split
from ltrp.core.options import ROUNDS
from ltrp.core.ranker import Ranker, rank


def _patch_means(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, S, S) -> mean over each patch and channel: (B, L), raster order."""
    return F.avg_pool2d(x, patch).mean(dim=1).flatten(1)


class RandomScorer:
    """Uniform random scores, a pure function of (seed, image): an image gets the same scores in any
    batch, and different images get independent ones."""

    name = "random"

    def __init__(self, patch_size: int, seed: int = 0) -> None:
        self.patch_size, self.seed = patch_size, seed

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        grid = images.shape[-1] // self.patch_size
        rows = []
        for image in images.detach().cpu().float():
            key = hashlib.shake_256(f"{self.seed}".encode() + image.numpy().tobytes()).digest(8)
            g = torch.Generator().manual_seed(int.from_bytes(key, "little") >> 1)
            rows.append(torch.rand(grid * grid, generator=g))
        return torch.stack(rows).to(images.device)


class StratifiedRandomScorer(RandomScorer):
    """Random, but spread over the grid: the grid is cut into 2 x 2 blocks and every block gives up
    one random patch before any gives a second, so keeping a quarter keeps one patch per block. A pure
    function of (seed, image), like `RandomScorer`."""

    name = "stratified_random"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        grid = images.shape[-1] // self.patch_size
        u = super().__call__(images)  # (B, L) in [0, 1)
        rows, cols = torch.arange(grid).repeat_interleave(grid), torch.arange(grid).repeat(grid)
        block = ((rows // 2) * grid + cols // 2).to(images.device)  # (L,) the block of each patch
        # Order within each block by u: a patch's turn is its rank in its block; turns come first.
        same_block = block[:, None] == block[None, :]  # (L, L)
        turn = ((u[:, None, :] > u[:, :, None]) & same_block).sum(dim=2)  # (B, L) patches before it
        return -turn.float() + u


class CenterScorer:
    """A center prior: minus the distance of each patch's centre from the image's centre."""

    name = "center"

    def __init__(self, patch_size: int) -> None:
        self.patch_size = patch_size

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        grid = images.shape[-1] // self.patch_size
        coords = torch.arange(grid, dtype=torch.float32, device=images.device) - (grid - 1) / 2
        dist = (coords[:, None] ** 2 + coords[None, :] ** 2).sqrt().flatten()
        return (-dist).expand(images.shape[0], -1).clone()


class VarianceScorer:
    """Pixel variance inside each patch, per channel, averaged over channels: a flat patch of any colour
    scores 0 (pooling the channels would score a flat coloured patch by its colour's spread across
    channels). By Parseval, this is also the patch's spectral energy without DC: the baseline any
    frequency scorer must beat."""

    name = "variance"

    def __init__(self, patch_size: int) -> None:
        self.patch_size = patch_size

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        p, (b, c) = self.patch_size, images.shape[:2]
        patches = F.unfold(images.float(), p, stride=p).view(b, c, p * p, -1)  # (B, C, p*p, L)
        return patches.var(dim=2, unbiased=False).mean(dim=1)


class GradientEnergyScorer:
    """Mean squared horizontal and vertical finite differences inside each patch."""

    name = "gradient"

    def __init__(self, patch_size: int) -> None:
        self.patch_size = patch_size

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        dx = F.pad((x[..., :, 1:] - x[..., :, :-1]) ** 2, (0, 1))
        dy = F.pad((x[..., 1:, :] - x[..., :-1, :]) ** 2, (0, 0, 0, 1))
        return _patch_means(dx + dy, self.patch_size)


class FolkRComScorer:
    """Energy of FOLK's RCom residual inside each patch, averaged over the tau set (docs/method.md, 5).
    Each tau's energies are first divided by their mean over the image's patches: raw energies shrink
    as tau grows, so a plain average would be the smallest tau's ranking alone."""

    name = "folk_rcom"

    def __init__(self, patch_size: int, taus: Sequence[float] = (0.005, 0.01, 0.05)) -> None:
        self.patch_size, self.taus = patch_size, tuple(taus)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        energies = [_patch_means(frequency_split(images, tau)[1] ** 2, self.patch_size) for tau in self.taus]
        normalised = [e / e.mean(dim=1, keepdim=True).clamp_min(1e-12) for e in energies]
        return torch.stack(normalised).mean(dim=0)


class RankerScorer:
    """The LTRP ranker (`ltrp.core.ranker.rank`: in sets of n over `rounds`, or in one pass)."""

    name = "ltrp"

    def __init__(self, model: Ranker, rounds: int = ROUNDS) -> None:
        self.model, self.rounds = model, rounds

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return rank(self.model, images, self.rounds)
