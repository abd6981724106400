import pytest
import torch

import ltrp

OFFICIAL_TOP_LEVEL = {
    "cls_token",
    "pos_embed",
    "patch_embed.proj.weight",
    "patch_embed.proj.bias",
    "norm.weight",
    "norm.bias",
    "mask_token",
    "decoder_pos_embed",
    "decoder_embed.weight",
    "decoder_embed.bias",
    "decoder_norm.weight",
    "decoder_norm.bias",
    "decoder_pred.weight",
    "decoder_pred.bias",
}
BLOCK_PARAMS = [
    f"{m}.{p}"
    for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
    for p in ("weight", "bias")
]


@pytest.mark.parametrize("name", ["mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14"])
def test_official_geometries_have_exactly_the_official_names_and_shapes(name: str) -> None:
    cfg = ltrp.GEOMETRIES[name]
    with torch.device("meta"):
        state = ltrp.MAE(cfg).state_dict()
    expected = OFFICIAL_TOP_LEVEL | {f"blocks.{i}.{p}" for i in range(cfg.depth) for p in BLOCK_PARAMS}
    expected |= {f"decoder_blocks.{i}.{p}" for i in range(8) for p in BLOCK_PARAMS}
    assert set(state) == expected
    assert state["pos_embed"].shape == (1, cfg.num_patches + 1, cfg.embed_dim)
    assert state["decoder_pred.weight"].shape == (cfg.patch_size**2 * 3, 512)
    assert cfg.num_patches == (256 if name.endswith("14") else 196)


def test_patchify_is_mae_layout_and_inverts(tiny_mae: ltrp.MAE) -> None:
    imgs = torch.randn(2, 3, 64, 64)
    x = tiny_mae.patchify(imgs)
    assert x.shape == (2, 64, 8 * 8 * 3)
    # Patch 9 = row 1, col 1; its first value is pixel (8, 8) of channel 0, its second channel 1.
    assert x[0, 9, 0] == imgs[0, 0, 8, 8] and x[0, 9, 1] == imgs[0, 1, 8, 8]
    assert torch.equal(tiny_mae.unpatchify(x), imgs)


def test_forward_shape_and_fixed_position_embeddings(tiny_mae: ltrp.MAE) -> None:
    visible = ltrp.visible_sets(["a", "b"], grid=8, mask_ratio=0.75)
    assert tiny_mae(torch.randn(2, 3, 64, 64), visible).shape == (2, 64, 192)
    assert not tiny_mae.pos_embed.requires_grad and not tiny_mae.decoder_pos_embed.requires_grad
    assert torch.all(tiny_mae.pos_embed[0, 0] == 0)


def test_reconstruction_of_visible_patches_ignores_masked_pixels(tiny_mae: ltrp.MAE) -> None:
    visible = ltrp.visible_sets(["a"], grid=8, mask_ratio=0.75)
    imgs = torch.randn(1, 3, 64, 64)
    changed = tiny_mae.unpatchify(
        tiny_mae.patchify(imgs).index_fill(
            1, torch.tensor([p for p in range(64) if p not in visible[0].tolist()]), 5.0
        )
    )
    torch.testing.assert_close(tiny_mae(imgs, visible), tiny_mae(changed, visible))


def test_fused_and_explicit_attention_agree(tiny_mae: ltrp.MAE) -> None:
    visible = ltrp.visible_sets(["a"], grid=8, mask_ratio=0.75)
    imgs = torch.randn(1, 3, 64, 64)
    fused = tiny_mae(imgs, visible)
    tiny_mae.set_fused_attn(False)
    torch.testing.assert_close(tiny_mae(imgs, visible), fused, rtol=1e-5, atol=1e-6)
