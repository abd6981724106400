import itertools

import pytest
import torch

from ltrp.core.ranking_metrics import kendall_tau


def _brute_force_tau(a: list[float], b: list[float]) -> float:
    pairs = list(itertools.combinations(range(len(a)), 2))
    signs = [((a[i] > a[j]) - (a[i] < a[j])) * ((b[i] > b[j]) - (b[i] < b[j])) for i, j in pairs]
    return sum(signs) / len(pairs)


@pytest.mark.parametrize("n", [2, 5, 19])
def test_kendall_tau_matches_its_definition(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    a, b = torch.randn(4, n, generator=g), torch.randn(4, n, generator=g)
    expected = [_brute_force_tau(x.tolist(), y.tolist()) for x, y in zip(a, b, strict=True)]
    torch.testing.assert_close(kendall_tau(a, b), torch.tensor(expected))
    assert torch.allclose(kendall_tau(a, a), torch.ones(4))
    assert torch.allclose(kendall_tau(a, -a), -torch.ones(4))
