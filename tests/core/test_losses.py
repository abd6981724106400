import itertools
import math

import pytest
import torch

from ltrp.core.losses import LOSSES, listmle, listnet, ranknet


def _plackett_luce_nll(s: list[float], y: list[float]) -> float:
    """-log P(order of y | weights exp(s)), by the product over positions, in plain floats."""
    order = sorted(range(len(y)), key=lambda i: -y[i])
    nll = 0.0
    for i, item in enumerate(order):
        nll -= math.log(math.exp(s[item]) / sum(math.exp(s[j]) for j in order[i:]))
    return nll


@pytest.mark.parametrize("n", [2, 3, 6])
def test_listmle_is_the_plackett_luce_negative_log_likelihood(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    s, y = (
        torch.randn(4, n, generator=g, dtype=torch.float64),
        torch.rand(4, n, generator=g, dtype=torch.float64),
    )
    expected = sum(_plackett_luce_nll(a.tolist(), b.tolist()) for a, b in zip(s, y, strict=True)) / 4
    assert listmle(s, y).item() == pytest.approx(expected, rel=1e-10)


def test_listmle_probabilities_of_all_orders_sum_to_one() -> None:
    s = torch.tensor([[0.3, -1.2, 2.0]], dtype=torch.float64)
    total = sum(
        math.exp(-listmle(s, torch.tensor([list(p)], dtype=torch.float64)).item())
        for p in itertools.permutations([0.0, 1.0, 2.0])
    )
    assert total == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e4])
def test_every_loss_is_finite_and_differentiable_with_extreme_inputs(name: str, scale: float) -> None:
    s = (torch.randn(3, 19) * scale).requires_grad_()
    y = torch.randn(3, 19) * scale
    loss = LOSSES[name](s, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_losses_prefer_the_true_order() -> None:
    y = torch.tensor([[0.3, 0.1, 0.2, 0.05]])
    good, bad = y * 10, -y * 10
    for fn in (listmle, listnet, ranknet):
        assert fn(good, y) < fn(bad, y)


def test_ranknet_ignores_ties() -> None:
    s = torch.tensor([[1.0, -1.0]])
    assert ranknet(s, torch.tensor([[0.5, 0.5]])).item() == 0.0
