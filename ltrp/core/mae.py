"""Masked autoencoder (He et al., 2021) with the official parameter names, built from timm blocks.

The module's state_dict keys are exactly those of facebookresearch/mae (`cls_token`, `pos_embed`,
`patch_embed.proj.*`, `blocks.{i}.*`, `norm.*`, `mask_token`, `decoder_pos_embed`, `decoder_embed.*`,
`decoder_blocks.{i}.*`, `decoder_norm.*`, `decoder_pred.*`), so official checkpoints load strictly.

Unlike the official code, the visible patches are given explicitly (`visible: (N, n)` patch indices,
sorted ascending) instead of drawn inside the forward: leave-one-out scoring needs to choose them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from ltrp.core.masking import visible_count
from ltrp.core.vit import PatchGrid, ViTEncoder, blocks, sincos_pos_embed


@dataclass(frozen=True)
class MAEConfig(PatchGrid):
    """Geometry of a masked autoencoder, and what its decoder was trained to predict."""

    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    norm_pix: bool = False  # True: targets were per-patch standardised pixels (MAE's norm_pix_loss)

    @property
    def encoder(self) -> dict:
        """The encoder's shape, as `ViTEncoder`'s arguments: `ViTEncoder(**cfg.encoder)`."""
        return {
            "img_size": self.img_size, "patch_size": self.patch_size, "in_chans": self.in_chans,
            "dim": self.embed_dim, "depth": self.depth, "heads": self.num_heads, "mlp_ratio": self.mlp_ratio,
            "norm_eps": self.norm_eps,
        }  # fmt: skip


_BASE = MAEConfig()

#: The official geometries (facebookresearch/mae `mae_vit_*`) and small ones for tests and demos.
GEOMETRIES: dict[str, MAEConfig] = {
    "mae_vit_base_patch16": _BASE,
    "mae_vit_large_patch16": replace(_BASE, embed_dim=1024, depth=24, num_heads=16),
    "mae_vit_huge_patch14": replace(_BASE, patch_size=14, embed_dim=1280, depth=32, num_heads=16),
    # 224 px like the real ones, so demo images and views need no special casing.
    "mae_vit_demo_patch16": replace(
        _BASE,
        embed_dim=192,
        depth=4,
        num_heads=3,
        decoder_embed_dim=128,
        decoder_depth=2,
        decoder_num_heads=4,
    ),
    "mae_vit_tiny_patch8": replace(
        _BASE,
        img_size=64,
        patch_size=8,
        embed_dim=64,
        depth=2,
        num_heads=4,
        decoder_embed_dim=32,
        decoder_depth=2,
        decoder_num_heads=4,
    ),
    # Fashion-MNIST (28 px, upscaled to 32) on an 8x8 grid: small enough to pre-train on two CPU cores
    # in minutes.
    "mae_vit_fmnist_patch4": replace(
        _BASE,
        img_size=32,
        patch_size=4,
        embed_dim=128,
        depth=4,
        num_heads=4,
        decoder_embed_dim=64,
        decoder_depth=2,
        decoder_num_heads=4,
    ),
    # Scenes (56 px, 4 px patches): the paper's 14 x 14 grid at a size two CPU cores pre-train.
    "mae_vit_scenes_patch4": replace(
        _BASE,
        img_size=56,
        patch_size=4,
        embed_dim=128,
        depth=4,
        num_heads=4,
        decoder_embed_dim=64,
        decoder_depth=2,
        decoder_num_heads=4,
    ),
}


class MAE(ViTEncoder):
    """ViT encoder + light ViT decoder predicting the pixels of every patch.

    Shapes: S = img_size, p = patch_size, L = (S/p)^2 patches, n visible, D / Dd encoder / decoder width.
    """

    def __init__(self, cfg: MAEConfig) -> None:
        super().__init__(**cfg.encoder)
        self.cfg = cfg
        ddim = cfg.decoder_embed_dim
        self.decoder_embed = nn.Linear(cfg.embed_dim, ddim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, ddim))
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed(cfg.grid, ddim), requires_grad=False)
        self.decoder_blocks = blocks(
            ddim, cfg.decoder_depth, cfg.decoder_num_heads, cfg.mlp_ratio, cfg.norm_eps
        )
        self.decoder_norm = nn.LayerNorm(ddim, eps=cfg.norm_eps)
        self.decoder_pred = nn.Linear(ddim, cfg.patch_size**2 * cfg.in_chans)
        self._init_weights()

    def set_fused_attn(self, enabled: bool) -> None:
        """Use `F.scaled_dot_product_attention` (flash / memory-efficient kernels) or explicit softmax."""
        for blk in [*self.blocks, *self.decoder_blocks]:
            blk.attn.fused_attn = enabled

    def compile_blocks(self) -> None:
        """`torch.compile` every transformer block in place (the blocks hold nearly all the FLOPs)."""
        for blk in [*self.blocks, *self.decoder_blocks]:
            blk.compile()

    def encoder_state(self) -> dict[str, torch.Tensor]:
        """The encoder's weights, under the names a `ViTEncoder` of the same shape has (no decoder)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(("decoder", "mask_token"))}

    # -- pixels <-> patches ---------------------------------------------------------------------------
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs: (N, C, S, S) -> (N, L, p*p*C), patches in raster order, pixels (row, col, channel)."""
        p, g, c = self.cfg.patch_size, self.cfg.grid, self.cfg.in_chans
        x = imgs.reshape(imgs.shape[0], c, g, p, g, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(imgs.shape[0], g * g, p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, L, p*p*C) -> imgs: (N, C, S, S)."""
        p, g, c = self.cfg.patch_size, self.cfg.grid, self.cfg.in_chans
        x = torch.einsum("nhwpqc->nchpwq", x.reshape(x.shape[0], g, g, p, p, c))
        return x.reshape(x.shape[0], c, g * p, g * p)

    # -- decoder --------------------------------------------------------------------------------------
    def decoder_input(self, latent: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Latents (N, 1 + n, D) -> decoder tokens (N, 1 + L, Dd): CLS, then every patch position in
        raster order, holding its embedded latent if visible and the mask token if not, plus position."""
        x = self.decoder_embed(latent)
        n_img, ddim = x.shape[0], x.shape[-1]
        canvas = self.mask_token.to(x.dtype).expand(n_img, self.cfg.num_patches, ddim).clone()
        canvas = canvas.scatter(1, visible.unsqueeze(-1).expand(-1, -1, ddim), x[:, 1:])
        return torch.cat([x[:, :1], canvas], dim=1) + self.decoder_pos_embed

    def decode_hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """Decoder tokens (N, T, Dd) -> last hidden states (N, T, Dd), before the norm and head."""
        for blk in self.decoder_blocks:
            tokens = blk(tokens)
        return tokens

    def predict(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., Dd) -> pixel predictions (..., p*p*C), in the decoder's target space."""
        return self.decoder_pred(self.decoder_norm(hidden))

    def forward(self, imgs: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """The plain MAE reconstruction. imgs: (N, C, S, S), visible: (N, n) -> (N, L, p*p*C)."""
        tokens = self.decoder_input(self.encode(imgs, visible), visible)
        return self.predict(self.decode_hidden(tokens))[:, 1:]

    # -- pre-training -----------------------------------------------------------------------------------
    def targets(self, imgs: torch.Tensor) -> torch.Tensor:
        """What the decoder learns to predict. imgs: (N, C, S, S) -> (N, L, p*p*C): the patches, each
        standardised on its own, (t - mean) / sqrt(var + 1e-6), when cfg.norm_pix (MAE's norm_pix_loss)."""
        target = self.patchify(imgs)
        if self.cfg.norm_pix:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)  # unbiased, as in MAE's code
            target = (target - mean) / (var + 1e-6) ** 0.5
        return target

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """MAE's loss: mean squared error on the masked patches only.

        Args:
            imgs: (N, C, S, S) the images the reconstruction was made from.
            pred: (N, L, p*p*C) the reconstruction, `self(imgs, visible)`.
            visible: (N, n) the patch indices the encoder saw; the loss ignores them.

        Returns:
            A scalar: the per-patch mean squared error averaged over the N * (L - n) masked patches
            (0 for an empty batch, so that data-parallel workers still take the step together).
        """
        errors = self.masked_error(imgs, pred, visible)
        return errors.sum() / max(1, len(errors))  # every image has L - n masked patches: equal weights

    def masked_error(self, imgs: torch.Tensor, pred: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Per image, the mean squared error of `pred` over the patches not in `visible`.

        imgs: (N, C, S, S), pred: (N, L, p*p*C) in the decoder's target space, visible: (N, n) -> (N,).
        """
        per_patch = (pred.float() - self.targets(imgs).float()).square().mean(dim=-1)  # (N, L)
        masked = torch.ones_like(per_patch).scatter_(1, visible, 0.0)
        return (per_patch * masked).sum(dim=1) / masked.sum(dim=1).clamp_min(1)


def random_visible(
    batch: int,
    num_patches: int,
    mask_ratio: float = 0.75,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """MAE's per-sample random masking, as the visible set: a uniform random subset of each row.

    Args:
        batch: N, the number of images.
        num_patches: L, patches per image.
        mask_ratio: fraction of patches hidden from the encoder.
        generator: source of randomness (a CPU generator; the result is moved to `device`).
        device: where the result goes.

    Returns:
        visible: (N, n) int64, each row distinct indices in [0, L) sorted ascending,
        n = int(L * (1 - mask_ratio)) as in MAE.
    """
    n = visible_count(num_patches, mask_ratio)
    noise = torch.rand(batch, num_patches, generator=generator)
    return noise.argsort(dim=1)[:, :n].sort(dim=1).values.to(device)
