"""Pruned inference and ToMe on real timm ViTs (tiny, CPU)."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ltrp.core.mae import GEOMETRIES, MAE
from ltrp.core.pruned import (
    FirstBlockSelector,
    TokenScorer,
    forward_kept,
    forward_shared,
    forward_tome,
    merge_tokens,
    tome_block,
    vit_from_mae,
)
from ltrp.core.ranker import keep_top

GRID, PATCH = 8, 4
L = GRID * GRID


def _vit(**kwargs: object) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(
        img_size=GRID * PATCH, patch_size=PATCH, embed_dim=48, depth=3, num_heads=4, num_classes=5, **kwargs
    ).eval()


VARIANTS = {
    "cls": {},
    "avg": {"global_pool": "avg"},
    "registers": {"reg_tokens": 2, "no_embed_class": True},
}


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(3, 3, GRID * PATCH, GRID * PATCH, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_keeping_every_patch_is_the_plain_forward(variant: str, images: torch.Tensor) -> None:
    model = _vit(**VARIANTS[variant])
    keep = torch.arange(L).expand(len(images), -1)
    with torch.no_grad():
        torch.testing.assert_close(forward_kept(model, images, keep), model(images), atol=1e-5, rtol=1e-5)


def _patch_mask(keep: torch.Tensor) -> torch.Tensor:
    """(B, k) kept positions -> (B, 1, S, S) pixels of the patches that were not kept."""
    dropped = torch.ones(keep.shape[0], L)
    dropped.scatter_(1, keep, 0.0)
    grid = dropped.reshape(-1, 1, GRID, GRID)
    return grid.repeat_interleave(PATCH, 2).repeat_interleave(PATCH, 3).bool()


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_only_the_kept_patches_reach_the_blocks(variant: str, images: torch.Tensor) -> None:
    model = _vit(**VARIANTS[variant])
    keep = keep_top(torch.randn(len(images), L, generator=torch.Generator().manual_seed(2)), 0.25)
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    with torch.no_grad():
        out = forward_kept(model, images, keep)
        # The dropped patches' pixels replaced by noise: nothing changes.
        noisy = torch.where(_patch_mask(keep), torch.randn_like(images) * 5, images)
        torch.testing.assert_close(forward_kept(model, noisy, keep), out)
        # The kept ones changed: the output does.
        assert not torch.allclose(
            forward_kept(model, torch.where(_patch_mask(keep), images, noisy * 0), keep), out
        )
        # The first block sees P + k tokens: the prefix, then each kept patch with its own position.
        tokens = model._pos_embed(model.patch_embed(images))
    prefix = model.num_prefix_tokens
    assert seen[0].shape == (len(images), prefix + keep.shape[1], 48)
    expected = torch.cat(
        [tokens[:, :prefix], tokens[:, prefix:].gather(1, keep[..., None].expand(-1, -1, 48))], 1
    )
    torch.testing.assert_close(seen[0], expected)


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_the_order_of_kept_tokens_does_not_matter(variant: str, images: torch.Tensor) -> None:
    model = _vit(**VARIANTS[variant])
    keep = keep_top(torch.randn(len(images), L, generator=torch.Generator().manual_seed(3)), 0.5)
    shuffled = keep[:, torch.randperm(keep.shape[1], generator=torch.Generator().manual_seed(4))]
    with torch.no_grad():
        torch.testing.assert_close(forward_kept(model, images, shuffled), forward_kept(model, images, keep))


def test_kept_positions_off_the_grid_are_refused(images: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"outside \[0, 64\) of the model.s 8x8 grid"):
        forward_kept(_vit(), images, torch.full((3, 4), L))


def test_fine_tuning_through_kept_tokens_reaches_the_weights(images: torch.Tensor) -> None:
    model = _vit().train()
    forward_kept(model, images, torch.arange(8).expand(3, -1)).sum().backward()
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0 and model.cls_token.grad.abs().sum() > 0


@pytest.mark.parametrize("variant", ["cls", "avg"], ids=str)
def test_tome_with_r_0_is_the_plain_forward(variant: str, images: torch.Tensor) -> None:
    model = _vit(**VARIANTS[variant])
    with torch.no_grad():
        torch.testing.assert_close(forward_tome(model, images, 0), model(images), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["cls", "avg"], ids=str)
def test_tome_on_kept_patches_merges_among_them_only(variant: str, images: torch.Tensor) -> None:
    model = _vit(**VARIANTS[variant])
    keep = keep_top(torch.randn(len(images), L, generator=torch.Generator().manual_seed(3)), 0.5)
    with torch.no_grad():
        kept = forward_kept(model, images, keep)
        torch.testing.assert_close(forward_tome(model, images, 0, keep), kept, atol=1e-5, rtol=1e-5)
        merged = forward_tome(model, images, 4, keep)
        noisy = torch.where(_patch_mask(keep), torch.randn_like(images) * 5, images)
        torch.testing.assert_close(forward_tome(model, noisy, 4, keep), merged, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(merged, kept, atol=1e-4)


@pytest.mark.parametrize("variant", ["cls", "avg"], ids=str)
def test_a_shared_first_block_that_keeps_every_patch_is_the_plain_forward(
    variant: str, images: torch.Tensor
) -> None:
    model, scorer = _vit(**VARIANTS[variant]), TokenScorer(48).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            forward_shared(model, scorer, images, 1.0), model(images), atol=1e-5, rtol=1e-5
        )


def test_a_shared_first_block_passes_on_the_patches_its_scorer_ranks_first(images: torch.Tensor) -> None:
    model, scorer = _vit(), TokenScorer(48).eval()
    seen = []
    model.blocks[1].register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    with torch.no_grad():
        out = forward_shared(model, scorer, images, 0.25)
        first = model.blocks[0](model._pos_embed(model.patch_embed(images)))
        best = scorer(first[:, 1:]).topk(L // 4, dim=1).indices.sort(dim=1).values
        torch.testing.assert_close(forward_kept_after_first(model, first, best), out, atol=1e-5, rtol=1e-5)
    assert seen[0].shape == (3, 1 + L // 4, 48)


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_a_first_block_selector_scores_its_own_models_patch_tokens(
    variant: str, images: torch.Tensor
) -> None:
    """Prefix tokens (CLS, registers) are not scored: one score per patch, from that patch's token."""
    model, scorer = _vit(**VARIANTS[variant]), TokenScorer(48).eval()
    with torch.no_grad():
        scores = FirstBlockSelector(model, scorer)(images)
        tokens = model.blocks[0](model.norm_pre(model._pos_embed(model.patch_embed(images))))
        expected = scorer(tokens[:, model.num_prefix_tokens :])
    assert scores.shape == (3, L)
    torch.testing.assert_close(scores, expected)


def forward_kept_after_first(
    model: VisionTransformer, first: torch.Tensor, keep: torch.Tensor
) -> torch.Tensor:
    """The ViT's blocks 2.. on CLS and the kept tokens of its first block's output."""
    kept = first[:, 1:].gather(1, keep.unsqueeze(-1).expand(-1, -1, first.shape[-1]))
    x = model.norm(model.blocks[1:](torch.cat([first[:, :1], kept], dim=1)))
    return model.forward_head(x)


@pytest.mark.parametrize("r", [1, 7, 16])
def test_each_tome_block_removes_r_tokens_and_keeps_the_size_total(r: int, images: torch.Tensor) -> None:
    model = _vit()
    with torch.no_grad():
        x = model._pos_embed(model.patch_embed(images))
        size = torch.ones(*x.shape[:2], 1)
        for block in model.blocks:
            tokens = x.shape[1]
            x, size = tome_block(block, x, size, r, prefix=1)
            assert x.shape[1] == tokens - min(r, (tokens - 1) // 2)
            torch.testing.assert_close(size.sum(dim=1), torch.full((3, 1), 1.0 + L))
            assert size[:, 0].eq(1).all()  # CLS is never merged
        out = forward_tome(model, images, r)
    assert out.shape == (3, 5) and torch.isfinite(out).all()
    assert not torch.allclose(out, model(images), atol=1e-4)


def test_merging_is_a_size_weighted_average_of_the_most_similar_pair() -> None:
    # Tokens after the prefix: A = {0, 2}, B = {1, 3}. A0's key matches B3's, A2's matches B1's weakly.
    x = torch.tensor([[[9.0], [1.0], [10.0], [5.0], [3.0]]])  # prefix, then tokens 0..3
    size = torch.tensor([[[1.0], [3.0], [1.0], [1.0], [1.0]]])
    keys = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [0.0, -1.0], [1.0, 0.05]]])
    merged, merged_size = merge_tokens(x, size, keys, r=1, prefix=1)
    # A0 (value 1, size 3) joins B3 (value 3, size 1): (3*1 + 1*3) / 4 = 1.5; A2 stays; B1 stays.
    assert merged.flatten().tolist() == [9.0, 5.0, 10.0, 1.5]
    assert merged_size.flatten().tolist() == [1.0, 1.0, 1.0, 4.0]


def test_tome_refuses_what_it_cannot_run(images: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="pooling"):
        forward_tome(_vit(global_pool="map"), images, 2)
    with pytest.raises(ValueError, match="at least 0"):
        forward_tome(_vit(), images, -1)


def test_a_vit_from_an_mae_runs_the_mae_encoder() -> None:
    torch.manual_seed(0)
    mae = MAE(GEOMETRIES["mae_vit_tiny_patch8"]).eval()
    vit = vit_from_mae(mae, num_classes=3).eval()
    images = torch.randn(2, 3, mae.cfg.img_size, mae.cfg.img_size)
    torch.testing.assert_close(vit.fc_norm.weight, mae.norm.weight)  # MAE's final norm, on the mean
    mae.norm = nn.Identity()  # the ViT normalises after pooling, the MAE before: compare the blocks
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(images), mae.encode(images), atol=1e-5, rtol=1e-5)
    assert vit(images).shape == (2, 3)


def test_a_vit_from_an_mae_refuses_weights_that_do_not_fit() -> None:
    mae = MAE(GEOMETRIES["mae_vit_tiny_patch8"])
    mae.register_parameter("extra", nn.Parameter(torch.zeros(1)))
    with pytest.raises(ValueError, match=r"does not fit.*extra"):
        vit_from_mae(mae, num_classes=3)
