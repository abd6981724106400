import itertools

import pytest
import torch

from ltrp.core.ranking_metrics import kendall_tau, ndcg_at_k, spearman


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


@pytest.mark.parametrize("n", [5, 19, 196])
def test_the_correlations_and_ndcg_agree_with_scipy_and_scikit_learn(n: int) -> None:
    """References independent of our code: scipy's Kendall tau and Spearman rho (no ties: tau-b is
    tau-a), scikit-learn's NDCG@k with non-negative gains."""
    from scipy.stats import kendalltau, spearmanr
    from sklearn.metrics import ndcg_score

    g = torch.Generator().manual_seed(n)
    a, b = torch.randn(3, n, generator=g), torch.randn(3, n, generator=g)
    for row in range(3):
        x, y = a[row].numpy(), b[row].numpy()
        assert kendall_tau(a, b)[row].item() == pytest.approx(kendalltau(x, y).statistic, abs=1e-6)
        assert spearman(a, b)[row].item() == pytest.approx(spearmanr(x, y).statistic, abs=1e-5)
    gains, k = b.abs(), min(5, n)
    expected = [ndcg_score(gains[r : r + 1].numpy(), a[r : r + 1].numpy(), k=k) for r in range(3)]
    torch.testing.assert_close(ndcg_at_k(a, gains, k), torch.tensor(expected, dtype=torch.float32))
