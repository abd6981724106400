"""Cheaper vision transformers: a timm `VisionTransformer` run on the patches a selector keeps, and
ToMe, the training-free baseline that merges similar tokens instead of dropping them.

Both wrap an unmodified timm model (its own modules and weights, no fork of its ViT):
- `forward_kept`: the prefix tokens (CLS, registers) plus the kept patch tokens, each with its own
  position embedding, through every block. A batch keeps a fixed k, so it stays one dense tensor.
- `forward_tome`: token merging (Bolya et al., ICLR 2023) as its paper describes it. In each block,
  between attention and MLP, the patch tokens are split alternately into sets A and B; each A token's
  edge goes to its most similar B token (cosine similarity of the attention keys, averaged over
  heads); the r most similar edges are merged by a size-weighted average, so every block removes r
  tokens. Attention is size-weighted (proportional attention: log(size) added to the logits), so a
  merged token counts for the patches it stands for. Prefix tokens are never merged. Given kept
  patches, it merges among those only: prune, then merge.
- `forward_shared`: the ranker shares the ViT's first block (beyond the paper). The ViT runs its
  first block on every token, a small `TokenScorer` on those tokens scores the patches, and the top-k
  go on through the other blocks: the ranker costs one block and a head.
- `vit_from_mae`: the timm ViT that MAE's fine-tuning starts from, its encoder's weights loaded.

Shapes: B images, L = grid^2 patches, P prefix tokens, k kept patches, T tokens now, D width.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from ltrp.core.mae import MAE
from ltrp.core.ranker import keep_top
from ltrp.core.vit import gather_tokens


def _embedded(model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """images: (B, C, H, W) -> prefix and patch tokens with their positions: (B, P + L, D)."""
    return model._pos_embed(model.patch_embed(images))  # timm's own step, as its forward_features runs it


def forward_kept(model: VisionTransformer, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The model's output from its prefix tokens and the kept patches only.

    Args:
        model: any timm VisionTransformer (trained on all tokens, or fine-tuned on kept ones).
        images: (B, C, H, W), normalised as the model expects.
        keep: (B, k) kept patch positions in [0, L), raster order on the model's patch grid; one k for
            the batch (`ltrp.keep_top` gives them from a ranker's scores).

    Returns:
        The model's head output, e.g. logits (B, num_classes). Differentiable: fine-tune through it.
    """
    x = model.norm(model.blocks(model.norm_pre(_kept_tokens(model, images, keep))))
    return model.forward_head(x)


def _kept_tokens(model: VisionTransformer, images: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """The prefix tokens and the kept patch tokens (all of them for None), with positions: (B, P + k, D)."""
    x = _embedded(model, images)
    if keep is None:
        return x
    _check_grid(model, keep)
    return _prefix_and_kept(x, keep, model.num_prefix_tokens)


def _prefix_and_kept(x: torch.Tensor, keep: torch.Tensor, prefix: int) -> torch.Tensor:
    """x (B, P + L, D), keep (B, k) patch positions -> the prefix tokens and the kept ones: (B, P + k, D)."""
    return torch.cat([x[:, :prefix], gather_tokens(x[:, prefix:], keep)], dim=1)


def _check_grid(model: VisionTransformer, keep: torch.Tensor) -> None:
    patches = model.patch_embed.num_patches
    grid = "x".join(map(str, model.patch_embed.grid_size))
    if keep.dim() != 2 or keep.shape[1] == 0:
        raise ValueError(f"keep must be (B, k >= 1) patch positions; got shape {tuple(keep.shape)}")
    low, high = int(keep.min()), int(keep.max())
    if low < 0 or high >= patches:
        raise ValueError(
            f"keep holds positions {low}..{high}, outside [0, {patches}) of the model's {grid} grid"
        )


class TokenScorer(nn.Module):
    """A patch score from each token the ViT's first block gives: (B, L, D) -> (B, L); larger = keep.
    Per token (norm, MLP), so its cost is a small fraction of a block's."""

    def __init__(self, width: int, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(width), nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, 1)
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(tokens).squeeze(-1)


def first_block_tokens(model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """images (B, C, H, W) -> every token after the model's first block: (B, P + L, D)."""
    return model.blocks[0](model.norm_pre(_embedded(model, images)))


def first_block_patches(model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """images (B, C, H, W) -> the patch tokens after the model's first block, what a `TokenScorer`
    scores: (B, L, D)."""
    return first_block_tokens(model, images)[:, model.num_prefix_tokens :]


class FirstBlockSelector(nn.Module):
    """A selector that runs ahead of the ViT it prunes: another model's embedding and first block (e.g.
    the MAE encoder's, before any labels) and a `TokenScorer` trained on its patch tokens.
    images (B, C, H, W) -> scores (B, L); its cost is that block and the head, on every token."""

    def __init__(self, model: VisionTransformer, scorer: TokenScorer) -> None:
        super().__init__()
        self.model, self.scorer = model.eval(), scorer.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.scorer(first_block_patches(self.model, images))


def shared_parameters(model: VisionTransformer) -> list[nn.Parameter]:
    """What `first_block_tokens` computes with: frozen while the rest fine-tunes on kept tokens, so the
    scorer keeps seeing the tokens it learned from."""
    embedding = [p for name, p in model.named_parameters() if name in ("cls_token", "reg_token", "pos_embed")]
    return [*model.patch_embed.parameters(), *embedding, *model.blocks[0].parameters()]


def forward_shared(
    model: VisionTransformer, scorer: TokenScorer, images: torch.Tensor, keep_ratio: float
) -> torch.Tensor:
    """The model's output when its first block's tokens choose the patches the other blocks see.

    Args:
        model: a timm VisionTransformer of at least two blocks.
        scorer: scores the first block's patch tokens (trained on them: `TokenScorer`).
        images: (B, C, H, W), normalised as the model expects.
        keep_ratio: the fraction of the L patches that go on past the first block.

    Returns:
        The model's head output, e.g. logits (B, num_classes).
    """
    x = first_block_tokens(model, images)
    prefix = model.num_prefix_tokens
    with torch.no_grad():  # the choice is not trained through: the scorer learns from LTRP's scores
        keep = keep_top(scorer(x[:, prefix:]), keep_ratio)
    x = model.norm(model.blocks[1:](_prefix_and_kept(x, keep, prefix)))
    return model.forward_head(x)


def forward_tome(
    model: VisionTransformer, images: torch.Tensor, r: int, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """The model's output with ToMe merging r tokens in every block (r = 0: the plain forward, or
    `forward_kept`'s with `keep`).

    Args:
        model: a timm VisionTransformer whose blocks are timm `Block`s with timm `Attention`, pooled by
            its CLS token ("token") or by a mean ("avg", then weighted by the merged tokens' sizes).
        images: (B, C, H, W), normalised as the model expects.
        r: tokens merged per block; at most half of the patch tokens left are merged in one block.
        keep: None for every patch, or (B, k) kept patch positions as `forward_kept` takes them: the
            merging then starts from those k patches (prune, then merge).

    Returns:
        The model's head output, e.g. logits (B, num_classes).
    """
    _check_tome(model, r)
    x = model.norm_pre(_kept_tokens(model, images, keep))
    size = x.new_ones(x.shape[0], x.shape[1], 1)  # patches each token stands for
    for block in model.blocks:
        x, size = tome_block(block, x, size, r, model.num_prefix_tokens)
    x = model.norm(x)
    if model.global_pool == "avg":  # a merged token stands for `size` patches in the mean
        prefix = model.num_prefix_tokens
        pooled = (x[:, prefix:] * size[:, prefix:]).sum(1) / size[:, prefix:].sum(1)
        return model.head(model.head_drop(model.fc_norm(pooled)))
    return model.forward_head(x)


def _check_tome(model: VisionTransformer, r: int) -> None:
    if r < 0:
        raise ValueError(f"ToMe's r is the tokens merged per block, at least 0; got {r}")
    if model.global_pool not in ("token", "avg") or model.attn_pool is not None:
        raise ValueError(f"ToMe here supports CLS ('token') or 'avg' pooling, not {model.global_pool!r}")
    for i, block in enumerate(model.blocks):
        if type(block) is not Block or type(block.attn) is not Attention or block.attn.gate is not None:
            raise ValueError(
                f"ToMe here needs timm's plain Block and Attention; block {i} is {type(block).__name__}"
            )


def tome_block(
    block: Block, x: torch.Tensor, size: torch.Tensor, r: int, prefix: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One timm Block with proportional attention, then r tokens merged, then the MLP.

    Args:
        block: a timm Block (its own modules and weights).
        x: (B, T, D) tokens, prefix first.
        size: (B, T, 1) patches each token stands for.
        r: tokens to merge.
        prefix: P, the leading tokens never merged.

    Returns:
        (B, T - r', D) tokens and (B, T - r', 1) sizes, r' = min(r, patch tokens // 2).
    """
    attended, keys = _proportional_attention(block.attn, block.norm1(x), size)
    x = x + block.drop_path1(block.ls1(attended))
    x, size = merge_tokens(x, size, keys, r, prefix)
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return x, size


def _proportional_attention(
    attn: Attention, x: torch.Tensor, size: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """timm Attention with log(size) added to every key's logit: x (B, T, D), size (B, T, 1) ->
    the attention output (B, T, D) and the keys averaged over heads (B, T, head_dim)."""
    b, t, _ = x.shape
    q, k, v = attn.qkv(x).reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    bias = size.log().transpose(1, 2).unsqueeze(1)  # (B, 1, 1, T): the same for every query and head
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=0.0)
    out = attn.proj(attn.norm(out.transpose(1, 2).reshape(b, t, attn.attn_dim)))
    return attn.proj_drop(out), k.mean(dim=1)


def merge_tokens(
    x: torch.Tensor, size: torch.Tensor, keys: torch.Tensor, r: int, prefix: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bipartite soft matching: the r A->B edges of highest key similarity merged by size-weighted
    average.

    Args:
        x: (B, T, D) tokens, prefix first; size: (B, T, 1); keys: (B, T, d) the similarity metric.
        r: tokens to remove; prefix: P leading tokens kept as they are.

    Returns:
        (B, T - r', D) tokens [prefix, unmerged A, B] and their sizes (B, T - r', 1), whose sum is
        unchanged; r' = min(r, (T - P) // 2).
    """
    r = min(r, (x.shape[1] - prefix) // 2)
    if r <= 0:
        return x, size
    head_x, head_size = x[:, :prefix], size[:, :prefix]
    weighted = x[:, prefix:] * size[:, prefix:]  # merged as sums, divided by the summed size at the end
    sizes = size[:, prefix:]
    metric = F.normalize(keys[:, prefix:], dim=-1)
    similarity = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)  # (B, |A|, |B|)
    best, partner = similarity.max(dim=-1)  # each A token's most similar B token
    order = best.argsort(dim=-1, descending=True)
    merged, kept = order[:, :r], order[:, r:]  # A tokens that go into their partner, A tokens that stay
    into = partner.gather(1, merged)  # (B, r) the B token each merged A token joins
    a_x, b_x = weighted[:, ::2], weighted[:, 1::2]
    a_size, b_size = sizes[:, ::2], sizes[:, 1::2]
    b_x = b_x.scatter_add(1, into.unsqueeze(-1).expand(-1, -1, x.shape[-1]), gather_tokens(a_x, merged))
    b_size = b_size.scatter_add(1, into.unsqueeze(-1), gather_tokens(a_size, merged))
    new_size = torch.cat([gather_tokens(a_size, kept), b_size], dim=1)
    new_x = torch.cat([gather_tokens(a_x, kept), b_x], dim=1) / new_size
    return torch.cat([head_x, new_x], dim=1), torch.cat([head_size, new_size], dim=1)


def vit_from_mae(mae: MAE, num_classes: int) -> VisionTransformer:
    """A timm ViT of the MAE encoder's shape with its weights, and a new head, as MAE's fine-tuning
    starts: patch tokens mean-pooled, the encoder's final norm applied to that mean (timm's fc_norm).

    Raises:
        ValueError: when a weight of the encoder does not fit (never loaded partly).
    """
    cfg = mae.cfg
    model = VisionTransformer(
        img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, num_classes=num_classes,
        embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
        global_pool="avg", norm_layer=partial(nn.LayerNorm, eps=cfg.norm_eps),
    )  # fmt: skip
    # MAE's final norm normalises the pooled patch tokens here (norm.* -> fc_norm.*), as in its fine-tuning.
    encoder = {("fc_" + k if k.startswith("norm.") else k): v for k, v in mae.encoder_state().items()}
    result = model.load_state_dict(encoder, strict=False)  # strict but for the new head:
    if set(result.missing_keys) != {"head.weight", "head.bias"} or result.unexpected_keys:
        raise ValueError(f"the MAE's encoder does not fit a timm ViT of its shape: {result}")
    return model
