"""ViT building blocks shared by the MAE, the ranker and the classifier: the patch grid, MAE's fixed
2-D sin-cos position embedding, and an encoder that runs on any subset of its patches."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn


@dataclass(frozen=True)
class PatchGrid:
    """Square images of img_size pixels, cut into (img_size / patch_size)^2 patches."""

    img_size: int = 224
    patch_size: int = 16

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2


def sincos_pos_embed(grid: int, dim: int) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos position embedding (facebookresearch/mae `get_2d_sincos_pos_embed`, with
    its zero CLS row): (1, 1 + grid*grid, dim).

    Patch k = row * grid + col gets [sin(col w), cos(col w), sin(row w), cos(row w)], each dim/4 wide,
    w_d = 10000^(-d / (dim/4)): the column comes first, as MAE's `meshgrid(w, h)` makes it.
    """
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    axis = torch.arange(grid, dtype=torch.float64)
    row, col = torch.meshgrid(axis, axis, indexing="ij")

    def one_axis(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega  # (grid*grid, dim/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    patches = torch.cat([one_axis(col), one_axis(row)], dim=1).float()
    return torch.cat([torch.zeros(1, dim), patches]).unsqueeze(0)


def blocks(dim: int, depth: int, heads: int, mlp_ratio: float, norm_eps: float) -> nn.ModuleList:
    norm = partial(nn.LayerNorm, eps=norm_eps)
    return nn.ModuleList(Block(dim, heads, mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(depth))


class ViTEncoder(nn.Module):
    """ViT with fixed 2-D sin-cos positions that can run on any subset of its patches: MAE's encoder,
    and the ranker's backbone. Flat attribute names, so that MAE keeps the official state_dict keys.

    Shapes: S = img_size, p = patch_size, L = (S/p)^2 patches, D = width.
    """

    def __init__(
        self,
        img_size: int,
        patch_size: int,
        in_chans: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
        norm_eps: float,
    ) -> None:
        super().__init__()
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        # Fixed, not learned, as in MAE; kept as parameters so the official key names and files match.
        self.pos_embed = nn.Parameter(sincos_pos_embed(grid, dim), requires_grad=False)
        self.blocks = blocks(dim, depth, heads, mlp_ratio, norm_eps)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)

    def _init_weights(self) -> None:
        """MAE's initialisation: xavier-uniform linears (patch embedding as a linear), N(0, .02) tokens."""
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for name, p in self.named_parameters():
            if name in ("cls_token", "mask_token"):
                nn.init.normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def embed_patches(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs: (N, C, S, S) -> patch tokens with position: (N, L, D)."""
        return self.patch_embed(imgs) + self.pos_embed[:, 1:]

    def encode_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens (N, n, D) -> normalised outputs with CLS first: (N, 1 + n, D)."""
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def encode(self, imgs: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        """imgs: (N, C, S, S), visible: (N, n) or None for all patches -> (N, 1 + n, D)."""
        x = self.embed_patches(imgs)
        return self.encode_tokens(x if visible is None else gather_tokens(x, visible))

    @torch.inference_mode()
    def cls_attention(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs: (B, C, S, S) -> (B, L): the last block's attention from CLS to each patch, averaged over
        heads, every patch seen. The usual attention-based token selector (EViT; DINO's maps): of a
        supervised classifier, or of a self-supervised encoder such as the MAE's."""
        x = self.embed_patches(imgs)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks[:-1]:
            x = blk(x)
        attn = self.blocks[-1].attn
        b, t, d = x.shape
        qkv = attn.qkv(self.blocks[-1].norm1(x)).reshape(b, t, 3, attn.num_heads, d // attn.num_heads)
        q, k = attn.q_norm(qkv[:, :1, 0].transpose(1, 2)), attn.k_norm(qkv[:, :, 1].transpose(1, 2))
        weights = (q * attn.scale @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, H, 1, 1 + L)
        return weights.mean(dim=1)[:, 0, 1:]


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: (N, T, C), index: (N, k) -> x[i, index[i]]: (N, k, C). A fixed-shape gather (no host sync)."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
