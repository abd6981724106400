"""REFERENCE ONLY: leave-one-out scores with the LTRP authors' mechanics, for tests and benchmarks.

One decoder pass per visible patch (over the whole batch), with an additive -inf mask on the left-out
token's attention row and column, explicit softmax, NaN -> 0 scrub, and boolean indexing to pick the
visible tokens. It is deliberately the authors' way, not a fast way. Use `ltrp.loo_scores` for real
work; this exists to prove that it computes the same numbers, and to measure how much faster it is.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block

from ltrp.core.leave_one_out import check_visible, pixel_distance
from ltrp.core.mae import MAE
from ltrp.core.options import Metric


def _isolating_mask(batch: int, tokens: int, position: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) additive mask: -inf on row and column `position[b]`: nobody attends to that token,
    and it attends to nobody (its softmax row becomes NaN, scrubbed to 0 in `_masked_block`)."""
    mask = torch.zeros(batch, 1, tokens, tokens, device=position.device)
    rows = torch.arange(batch, device=position.device)
    mask[rows, 0, position, :] = float("-inf")
    mask[rows, 0, :, position] = float("-inf")
    return mask


def _masked_block(blk: Block, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A timm ViT block with explicit attention: softmax(q k^T * scale + mask), then NaN -> 0."""
    attn_mod = blk.attn
    b, t, c = x.shape
    qkv = attn_mod.qkv(blk.norm1(x)).reshape(b, t, 3, attn_mod.num_heads, attn_mod.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn_mod.q_norm(q), attn_mod.k_norm(k)
    attn = ((q * attn_mod.scale) @ k.transpose(-2, -1) + mask).softmax(dim=-1)
    attn = torch.nan_to_num(attn, nan=0.0)
    out = attn_mod.proj(attn_mod.norm((attn @ v).transpose(1, 2).reshape(b, t, c)))
    x = x + blk.ls1(out)
    return x + blk.ls2(blk.mlp(blk.norm2(x)))


def _decode_isolated(mae: MAE, tokens: torch.Tensor, patch: torch.Tensor) -> torch.Tensor:
    """Decoder tokens (B, 1+L, Dd) with patch[b]'s token isolated -> pixel predictions (B, L, P)."""
    mask = _isolating_mask(tokens.shape[0], tokens.shape[1], 1 + patch)
    for blk in mae.decoder_blocks:
        tokens = _masked_block(blk, tokens, mask)
    return mae.predict(tokens)[:, 1:]


@torch.inference_mode()
def reference_loo_scores(
    mae: MAE, images: torch.Tensor, visible: torch.Tensor, *, metric: Metric = "l1"
) -> torch.Tensor:
    """`ltrp.loo_scores` in decoder mode, the authors' (images: (B, C, S, S), visible: (B, n) -> (B, n)
    float32). Encoder mode needs no special mechanics: it is the plain MAE forward without v."""
    num_patches = mae.cfg.num_patches
    check_visible(visible, num_patches)
    batch, n = visible.shape
    is_visible = torch.zeros(batch, num_patches, dtype=torch.bool, device=visible.device)
    is_visible[torch.arange(batch)[:, None], visible] = True
    is_masked = ~is_visible

    patches = mae.embed_patches(images)
    dim = patches.shape[-1]
    latent = mae.encode_tokens(patches[is_visible].reshape(batch, n, dim))
    tokens = mae.decoder_input(latent, visible)
    anchor = mae(images, visible)  # (B, L, P): the plain reconstruction

    scores = []
    for j in range(n):
        recon = _decode_isolated(mae, tokens, visible[:, j])
        per_patch = torch.stack(
            [pixel_distance(anchor[b, is_masked[b]], recon[b, is_masked[b]], metric) for b in range(batch)]
        )
        scores.append(per_patch)
    return torch.stack(scores, dim=1)
