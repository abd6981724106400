import numpy as np
import pytest
import torch

import ltrp
from ltrp.core.ranker import RANKER_GEOMETRIES, Ranker
from ltrp.core.vit import sincos_pos_embed


def _mae_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """facebookresearch/mae `get_1d_sincos_pos_embed_from_grid`: (M,) positions -> (M, dim)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = pos.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def _mae_2d(dim: int, grid_size: int) -> np.ndarray:
    """facebookresearch/mae `get_2d_sincos_pos_embed(dim, grid_size, cls_token=True)`: (1 + G*G, dim)."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0)  # w goes first, as in MAE
    emb = np.concatenate([_mae_1d(dim // 2, grid[0]), _mae_1d(dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, dim]), emb], axis=0)


@pytest.mark.parametrize(
    ("grid", "dim"), [(14, 768), (14, 1024), (16, 1280), (8, 64), (4, 128), (8, 32), (3, 4)]
)
def test_sincos_pos_embed_is_maes(grid: int, dim: int) -> None:
    got = sincos_pos_embed(grid, dim)
    assert got.shape == (1, 1 + grid * grid, dim) and got.dtype == torch.float32
    np.testing.assert_allclose(got[0].numpy(), _mae_2d(dim, grid), rtol=0, atol=1e-6)


def test_sincos_pos_embed_puts_the_column_first() -> None:
    emb = sincos_pos_embed(4, 8)[0, 1:]  # quarters of width 2: sin(col), cos(col), sin(row), cos(row)
    # Patch 1 is row 0, column 1; patch 4 is row 1, column 0.
    assert torch.equal(emb[1, 4:], torch.tensor([0.0, 0.0, 1.0, 1.0]))
    assert torch.equal(emb[4, :4], torch.tensor([0.0, 0.0, 1.0, 1.0]))
    assert emb[1, 0] == pytest.approx(np.sin(1.0)) and emb[4, 4] == pytest.approx(np.sin(1.0))


@pytest.mark.parametrize("dim", [6, 10, 66, 3])
def test_a_width_not_divisible_by_four_is_refused(dim: int) -> None:
    with pytest.raises(ValueError, match=f"divisible by 4, got {dim}"):
        sincos_pos_embed(4, dim)


def test_fresh_models_carry_the_fixed_embedding() -> None:
    torch.manual_seed(0)
    mae_cfg, ranker_cfg = ltrp.GEOMETRIES["mae_vit_tiny_patch8"], RANKER_GEOMETRIES["ltrp_vit_micro_patch8"]
    mae, ranker = ltrp.MAE(mae_cfg), Ranker(ranker_cfg)  # after their weight initialisation
    for param, dim, grid in [
        (mae.pos_embed, mae_cfg.embed_dim, mae_cfg.grid),
        (mae.decoder_pos_embed, mae_cfg.decoder_embed_dim, mae_cfg.grid),
        (ranker.pos_embed, ranker_cfg.embed_dim, ranker_cfg.grid),
    ]:
        assert not param.requires_grad
        assert param.shape == (1, 1 + grid * grid, dim)
        np.testing.assert_allclose(param.detach()[0].numpy(), _mae_2d(dim, grid), rtol=0, atol=1e-6)
