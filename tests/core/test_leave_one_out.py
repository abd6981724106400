import pytest
import torch

import ltrp
from ltrp.core.leave_one_out import drop_one, masked_positions
from ltrp.core.reference_loop import reference_loo_scores


def _random_visible(batch: int, num_patches: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(num_patches, generator=g)[:n].sort().values for _ in range(batch)])


SMALL = ltrp.GEOMETRIES["mae_vit_tiny_patch8"]
GEOMETRIES = {
    "tiny_patch8": SMALL,
    "grid7_patch16": ltrp.MAEConfig(
        img_size=112,
        patch_size=16,
        embed_dim=96,
        depth=2,
        num_heads=3,
        decoder_embed_dim=64,
        decoder_depth=3,
        decoder_num_heads=2,
    ),
    "grid6_patch4_deep": ltrp.MAEConfig(
        img_size=24,
        patch_size=4,
        embed_dim=48,
        depth=3,
        num_heads=2,
        decoder_embed_dim=48,
        decoder_depth=4,
        decoder_num_heads=4,
    ),
}


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("metric", ["l1", "l2"])
def test_batched_equals_reference_loop(geometry: str, batch: int, metric: str) -> None:
    # Decoder mode against the authors' mechanics (-inf isolation); encoder mode has its own reference.
    cfg = GEOMETRIES[geometry]
    torch.manual_seed(batch)
    mae = ltrp.MAE(cfg).eval()
    images = torch.randn(batch, 3, cfg.img_size, cfg.img_size)
    n = max(2, cfg.num_patches // 5)
    visible = _random_visible(batch, cfg.num_patches, n, seed=batch)
    # Small chunks, so that chunk boundaries fall inside images.
    fast = ltrp.loo_scores(mae, images, visible, metric=metric, max_tokens=3 * cfg.num_patches)
    slow = reference_loo_scores(mae, images, visible, metric=metric)
    assert fast.shape == slow.shape == (batch, n)
    assert fast.dtype == torch.float32
    assert (fast - slow).abs().max() < 1e-5 * slow.abs().max()
    assert torch.equal(fast.argsort(dim=1), slow.argsort(dim=1))


def _plain_mae_encoder_scores(
    mae: ltrp.MAE, images: torch.Tensor, visible: torch.Tensor, metric: str
) -> torch.Tensor:
    """Encoder mode by its definition, one v at a time: R_v is the plain MAE forward on the visible set
    without v (mask tokens at every hidden position, v's included), compared with A = the forward on
    all n visible patches at the L - n originally masked positions."""
    anchor = mae(images, visible)  # (B, L, P)
    scores = torch.empty(visible.shape, dtype=torch.float32)
    for b, row in enumerate(visible.tolist()):
        masked = [p for p in range(mae.cfg.num_patches) if p not in row]
        for j in range(len(row)):
            kept = torch.tensor([row[:j] + row[j + 1 :]])
            diff = anchor[b, masked] - mae(images[b : b + 1], kept)[0, masked]
            scores[b, j] = (diff.abs() if metric == "l1" else diff.square()).mean()
    return scores


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("metric", ["l1", "l2"])
def test_encoder_mode_equals_the_plain_mae_with_v_masked(geometry: str, metric: str) -> None:
    cfg = GEOMETRIES[geometry]
    torch.manual_seed(7)
    mae = ltrp.MAE(cfg).eval()
    torch.nn.init.normal_(mae.mask_token)  # zero at init: random, so v's slot must hold this very token
    images = torch.randn(2, 3, cfg.img_size, cfg.img_size)
    visible = _random_visible(2, cfg.num_patches, max(2, cfg.num_patches // 5), seed=7)
    # Small chunks, so that chunk boundaries fall inside images.
    fast = ltrp.loo_scores(
        mae, images, visible, mode="encoder", metric=metric, max_tokens=3 * cfg.num_patches
    )
    with torch.inference_mode():
        slow = _plain_mae_encoder_scores(mae, images, visible, metric)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5 * slow.abs().max().item())


def test_modes_differ_and_scores_are_positive(tiny_mae: ltrp.MAE) -> None:
    images = torch.randn(2, 3, 64, 64)
    visible = ltrp.visible_sets(["a", "b"], grid=8, mask_ratio=0.75)
    dec = ltrp.loo_scores(tiny_mae, images, visible, mode="decoder")
    enc = ltrp.loo_scores(tiny_mae, images, visible, mode="encoder")
    assert (dec > 0).all() and (enc > 0).all()
    assert not torch.allclose(dec, enc)


def test_chunk_size_does_not_change_scores(tiny_mae: ltrp.MAE) -> None:
    images = torch.randn(4, 3, 64, 64)
    visible = ltrp.visible_sets(range(4), grid=8, mask_ratio=0.75)
    whole = ltrp.loo_scores(tiny_mae, images, visible, max_tokens=10**6)
    one_by_one = ltrp.loo_scores(tiny_mae, images, visible, max_tokens=1)
    torch.testing.assert_close(whole, one_by_one, rtol=1e-5, atol=0)


def test_score_of_an_image_does_not_depend_on_its_batch(tiny_mae: ltrp.MAE) -> None:
    images = torch.randn(5, 3, 64, 64)
    visible = ltrp.visible_sets(range(5), grid=8, mask_ratio=0.75)
    together = ltrp.loo_scores(tiny_mae, images, visible)
    alone = ltrp.loo_scores(tiny_mae, images[2:3], visible[2:3])
    torch.testing.assert_close(together[2:3], alone, rtol=1e-5, atol=0)


def test_bf16_autocast_runs_and_stays_close(tiny_mae: ltrp.MAE) -> None:
    images = torch.randn(2, 3, 64, 64)
    visible = ltrp.visible_sets(range(2), grid=8, mask_ratio=0.75)
    exact = ltrp.loo_scores(tiny_mae, images, visible)
    low = ltrp.loo_scores(tiny_mae, images, visible, autocast_dtype=torch.bfloat16)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    assert (low - exact).abs().max() < 0.1 * exact.abs().max()


def test_masked_positions_are_the_complement() -> None:
    visible = torch.tensor([[0, 3, 5], [1, 2, 7]])
    assert masked_positions(visible, 8).tolist() == [[1, 2, 4, 6, 7], [0, 3, 4, 5, 6]]


def test_drop_one_removes_each_index_in_turn() -> None:
    assert drop_one(torch.tensor([[4, 6, 9]])).tolist() == [[[6, 9], [4, 9], [4, 6]]]


@pytest.mark.parametrize(
    ("visible", "message"),
    [
        (torch.tensor([[3, 1, 5]]), "strictly increasing"),
        (torch.tensor([[1, 1, 5]]), "strictly increasing"),
        (torch.tensor([[1, 5, 64]]), "strictly increasing"),
        (torch.tensor([1, 5, 7]), r"\(B, n\)"),
        (torch.tensor([[1.0, 5.0]]), "int64"),
    ],
)
def test_refuses_malformed_visible_sets(tiny_mae: ltrp.MAE, visible: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ltrp.loo_scores(tiny_mae, torch.randn(1, 3, 64, 64), visible)


def test_refuses_unknown_mode_and_metric(tiny_mae: ltrp.MAE) -> None:
    args = (tiny_mae, torch.randn(1, 3, 64, 64), ltrp.visible_sets(["a"], grid=8))
    with pytest.raises(ValueError, match="mode"):
        ltrp.loo_scores(*args, mode="both")
    with pytest.raises(ValueError, match="metric"):
        ltrp.loo_scores(*args, metric="ssim")


@pytest.mark.gpu
def test_cuda_bf16_scores_rank_like_fp32() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from ltrp.core.ranking_metrics import kendall_tau

    torch.manual_seed(0)
    cfg = ltrp.GEOMETRIES["mae_vit_base_patch16"]
    mae = ltrp.MAE(cfg).eval().cuda()
    images = torch.randn(8, 3, 224, 224, device="cuda")
    visible = ltrp.visible_sets(range(8), grid=cfg.grid).cuda()
    torch.backends.cuda.matmul.allow_tf32 = False
    exact = ltrp.loo_scores(mae, images, visible)
    torch.testing.assert_close(
        exact.cpu(), reference_loo_scores(mae, images, visible).cpu(), rtol=1e-4, atol=0
    )
    low = ltrp.loo_scores(mae, images, visible, autocast_dtype=torch.bfloat16)
    assert kendall_tau(low, exact).mean() > 0.8
