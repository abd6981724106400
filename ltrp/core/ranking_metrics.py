"""Ranking agreement measures, batched over rows."""

from __future__ import annotations

import torch


def kendall_tau(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Kendall's tau-a between matching rows: a, b: (B, n) -> (B,), in [-1, 1]. O(n^2) per row, which
    is cheap for patch lists (n <= a few hundred) and runs on any device."""
    concordance = torch.sign(a[:, :, None] - a[:, None, :]) * torch.sign(b[:, :, None] - b[:, None, :])
    n = a.shape[1]
    return concordance.sum(dim=(1, 2)) / (n * (n - 1))


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman's rank correlation between matching rows: a, b: (B, n) -> (B,)."""
    ra, rb = (x.argsort(dim=1).argsort(dim=1).float() for x in (a, b))
    ra, rb = ra - ra.mean(dim=1, keepdim=True), rb - rb.mean(dim=1, keepdim=True)
    return (ra * rb).sum(dim=1) / (ra.norm(dim=1) * rb.norm(dim=1)).clamp_min(1e-12)


def ndcg_at_k(scores: torch.Tensor, relevance: torch.Tensor, k: int) -> torch.Tensor:
    """NDCG@k of ranking by `scores`, with gains `relevance` (>= 0): (B, n) -> (B,)."""
    discount = 1.0 / torch.log2(torch.arange(2, k + 2, device=scores.device, dtype=torch.float32))
    dcg = (relevance.gather(1, scores.topk(k, dim=1).indices).float() * discount).sum(dim=1)
    ideal = (relevance.topk(k, dim=1).values.float() * discount).sum(dim=1)
    return dcg / ideal.clamp_min(1e-12)


def topk_overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """Fraction of the top-k positions of `a` that are also top-k in `b`: (B, n) -> (B,)."""
    top_a = torch.zeros_like(a, dtype=torch.bool).scatter_(1, a.topk(k, dim=1).indices, True)
    top_b = torch.zeros_like(b, dtype=torch.bool).scatter_(1, b.topk(k, dim=1).indices, True)
    return (top_a & top_b).sum(dim=1).float() / k
