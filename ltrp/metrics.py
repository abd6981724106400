"""Ranking agreement measures, batched over rows."""

from __future__ import annotations

import torch


def kendall_tau(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Kendall's tau-a between matching rows: a, b: (B, n) -> (B,), in [-1, 1]. O(n^2) per row, which
    is cheap for patch lists (n <= a few hundred) and runs on any device."""
    concordance = torch.sign(a[:, :, None] - a[:, None, :]) * torch.sign(b[:, :, None] - b[:, None, :])
    n = a.shape[1]
    return concordance.sum(dim=(1, 2)) / (n * (n - 1))
