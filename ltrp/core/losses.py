"""Listwise, pairwise and pointwise ranking losses. One interface: (s, y) -> scalar, where s (B, n) are
ranker outputs and y (B, n) pseudo-scores at the same positions (larger = more important)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def listmle_per_row(s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of y's order under a Plackett-Luce model with weights exp(s), per row:
    sum_i [log sum_{j >= i} exp(s_pi(j)) - s_pi(i)], pi = argsort(y, descending): (B, n) -> (B,).
    The tail sums are a reversed log-cumsum-exp, stable for any magnitude of s."""
    order = y.argsort(dim=1, descending=True)
    s_sorted = s.gather(1, order)
    tails = s_sorted.flip(1).logcumsumexp(dim=1).flip(1)
    return (tails - s_sorted).sum(dim=1)


def listmle(s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """ListMLE (the authors' loss): `listmle_per_row`, batch mean."""
    return listmle_per_row(s, y).mean()


def listnet(s: torch.Tensor, y: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Cross-entropy between softmax(y / t) and softmax(s); batch mean. Pseudo-scores are small
    numbers (~1e-2), so `temperature` sets how peaked the target distribution is."""
    target = F.softmax(y / temperature, dim=1)
    return -(target * F.log_softmax(s, dim=1)).sum(dim=1).mean()


def ranknet(s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Logistic loss log(1 + exp(-(s_i - s_j))) over all pairs with y_i > y_j; mean over pairs."""
    pairs = (y[:, :, None] > y[:, None, :]).to(s.dtype)  # (B, n, n): i ranked above j
    losses = F.softplus(-(s[:, :, None] - s[:, None, :]))
    return (losses * pairs).sum() / pairs.sum().clamp_min(1)


def pointwise_mse(s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MSE between s and y: scale-sensitive, a weak baseline."""
    return F.mse_loss(s, y)


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "listmle": listmle,
    "listnet": listnet,
    "ranknet": ranknet,
    "mse": pointwise_mse,
}
