import subprocess
import sys

import pytest
import torch

from ltrp import visible_count, visible_sets
from ltrp.core.masking import cover_sets


def test_mae_formula_gives_19_of_196_at_ratio_point_9() -> None:
    assert visible_count(196, 0.9) == 19
    assert visible_count(256, 0.9) == 25
    assert visible_count(64, 0.75) == 16


@pytest.mark.parametrize(("grid", "ratio"), [(14, 0.9), (8, 0.75), (16, 0.5)])
def test_rows_are_sorted_distinct_in_range_and_of_size_n(grid: int, ratio: float) -> None:
    vis = visible_sets([f"img{i}" for i in range(50)], grid=grid, mask_ratio=ratio)
    assert vis.shape == (50, visible_count(grid * grid, ratio))
    assert vis.dtype == torch.long
    assert (vis.diff(dim=1) > 0).all()
    assert vis.min() >= 0 and vis.max() < grid * grid


def test_independent_of_batch_order_and_size() -> None:
    ids = [f"n01440764/{i}.JPEG" for i in range(40)]
    whole = dict(zip(ids, visible_sets(ids, grid=14), strict=True))
    shuffled = [ids[i] for i in torch.randperm(40, generator=torch.Generator().manual_seed(1))]
    for start in range(0, 40, 7):  # odd batch size, shuffled order
        chunk = shuffled[start : start + 7]
        for image_id, row in zip(chunk, visible_sets(chunk, grid=14), strict=True):
            assert torch.equal(row, whole[image_id])


def test_same_in_a_fresh_process() -> None:
    code = "import ltrp; print(ltrp.visible_sets(['a', 'b/c.png', 7], grid=14, seed=3, view=2).tolist())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert eval(out) == visible_sets(["a", "b/c.png", 7], grid=14, seed=3, view=2).tolist()


def test_seed_view_and_id_each_change_the_set() -> None:
    base = visible_sets(["x"], grid=14)
    assert not torch.equal(base, visible_sets(["x"], grid=14, seed=1))
    assert not torch.equal(base, visible_sets(["x"], grid=14, view=1))
    assert not torch.equal(base, visible_sets(["y"], grid=14))
    assert torch.equal(visible_sets([7], grid=14), visible_sets(["7"], grid=14))


def test_roughly_uniform_over_positions() -> None:
    vis = visible_sets(range(4000), grid=14)
    counts = torch.bincount(vis.flatten(), minlength=196).float()
    expected = 4000 * 19 / 196  # ~388 per position; a binomial sd of ~19
    assert (counts - expected).abs().max() < 6 * expected**0.5


@pytest.mark.parametrize("ratio", [1.0, -0.1, 0.999])
def test_refuses_ratios_that_leave_nothing(ratio: float) -> None:
    with pytest.raises(ValueError, match="mask_ratio"):
        visible_sets(["x"], grid=14, mask_ratio=ratio)


@pytest.mark.parametrize(("grid", "ratio", "rounds"), [(14, 0.9, 1), (14, 0.9, 3), (8, 0.75, 2), (4, 0.5, 1)])
def test_cover_sets_score_every_patch_at_least_once_per_round(grid: int, ratio: float, rounds: int) -> None:
    L, n = grid * grid, visible_count(grid * grid, ratio)
    per_round = -(-L // n)
    sets = cover_sets("img", grid=grid, mask_ratio=ratio, seed=2, rounds=rounds)
    assert sets.shape == (rounds * per_round, n)
    assert torch.equal(sets, sets.sort(dim=1).values)
    assert all(len(set(row.tolist())) == n for row in sets)  # no patch twice in one set
    for r in range(rounds):
        counts = torch.bincount(sets[r * per_round : (r + 1) * per_round].flatten(), minlength=L)
        assert counts.min() == 1 and counts.sum() == per_round * n  # all covered; only the top-up twice
        assert (counts == 2).sum() == per_round * n - L
    if rounds > 1:  # each round draws its own permutation
        assert not torch.equal(sets[:per_round], sets[per_round : 2 * per_round])
    assert torch.equal(sets, cover_sets("img", grid=grid, mask_ratio=ratio, seed=2, rounds=rounds))
    assert not torch.equal(sets, cover_sets("img", grid=grid, mask_ratio=ratio, seed=3, rounds=rounds))
