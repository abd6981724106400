"""The LTRP ranker: a ViT that scores every patch position of an image in one forward pass, no MAE.

The authors' head is one Linear(D -> L) on the final CLS token: a score per patch *position*. The
per-token variant scores each token from its own output. The authors' training is asymmetric: the
ranker sees only CLS + the n scored visible patches, while at inference it sees all L patches; the
symmetric variant trains as it infers, on all L patches with the loss at the n scored positions.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from ltrp.core.options import Head, Training
from ltrp.core.vit import PatchGrid, ViTEncoder


@dataclass(frozen=True)
class RankerConfig(PatchGrid):
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    head: Head = "cls"


#: ViT-S/16 (the paper's ranker, ~21M parameters) and small ones for tests and demos.
RANKER_GEOMETRIES: dict[str, RankerConfig] = {
    "ltrp_vit_small_patch16": RankerConfig(),
    "ltrp_vit_tiny_patch16": replace(RankerConfig(), embed_dim=192, depth=6, num_heads=3),
    "ltrp_vit_micro_patch8": RankerConfig(img_size=64, patch_size=8, embed_dim=64, depth=2, num_heads=4),
    # Fashion-MNIST (28 px upscaled to 32): the grid of the MAE "mae_vit_fmnist_patch4".
    "ltrp_vit_fmnist_patch4": RankerConfig(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=4),
    # Scenes (56 px): the 14 x 14 grid of the MAE "mae_vit_scenes_patch4", the paper's.
    "ltrp_vit_scenes_patch4": RankerConfig(img_size=56, patch_size=4, embed_dim=96, depth=4, num_heads=4),
    # The same grids at about a tenth of the compute per token: rankers cheap next to the ViT they prune.
    "ltrp_vit_fmnist_tiny_patch4": RankerConfig(
        img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3
    ),
    "ltrp_vit_scenes_tiny_patch4": RankerConfig(
        img_size=56, patch_size=4, embed_dim=48, depth=2, num_heads=3
    ),
    # The encoder of the shipped scenes MAE ("mae_vit_scenes_patch4"): a ranker that can start from it.
    "ltrp_vit_scenes_mae_patch4": RankerConfig(
        img_size=56, patch_size=4, embed_dim=128, depth=4, num_heads=4
    ),
}


class Ranker(ViTEncoder):
    """imgs: (B, 3, S, S) -> a score per patch position; larger = keep."""

    def __init__(self, cfg: RankerConfig) -> None:
        super().__init__(
            cfg.img_size,
            cfg.patch_size,
            3,
            cfg.embed_dim,
            cfg.depth,
            cfg.num_heads,
            cfg.mlp_ratio,
            norm_eps=1e-6,
        )
        self.cfg = cfg
        self.head = nn.Linear(cfg.embed_dim, cfg.num_patches if cfg.head == "cls" else 1)
        self._init_weights()

    def forward(self, imgs: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        """Scores of the given patch positions.

        Args:
            imgs: (B, 3, S, S), normalised like the MAE's inputs.
            visible: (B, n) positions the ranker sees (asymmetric training), or None for all L.

        Returns:
            (B, n) scores aligned with `visible`, or (B, L) in raster order when `visible` is None.
        """
        out = self.encode(imgs, visible)  # (B, 1 + n, D)
        if self.cfg.head == "token":
            return self.head(out[:, 1:]).squeeze(-1)
        scores = self.head(out[:, 0])  # (B, L): one per position, from the CLS token alone
        return scores if visible is None else scores.gather(1, visible)


def init_from_encoder(model: Ranker, encoder: dict[str, torch.Tensor]) -> None:
    """Starts the ranker from a ViT encoder's weights (an MAE's, say): every backbone tensor is copied,
    the head stays new. Strict: the encoder must have every backbone tensor at the same shape (the same
    patch grid, width, depth and MLP), or nothing is copied.

    Args:
        encoder: a state dict with the MAE's encoder names (`patch_embed.*`, `cls_token`, `pos_embed`,
            `blocks.{i}.*`, `norm.*`); other entries (a decoder's) are ignored.

    Raises:
        ValueError: naming the backbone tensors that are missing or of another shape.
    """
    backbone = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    missing = sorted(k for k in backbone if k not in encoder)
    other = sorted(k for k in backbone if k in encoder and encoder[k].shape != backbone[k].shape)
    if missing or other:
        shapes = ", ".join(f"{k} {tuple(encoder[k].shape)} vs {tuple(backbone[k].shape)}" for k in other[:3])
        raise ValueError(
            f"the encoder does not fit the ranker's backbone ({model.cfg.embed_dim} wide, {model.cfg.depth} "
            f"blocks, {model.cfg.grid}x{model.cfg.grid} patches): {len(missing)} tensor(s) missing"
            + (f" (e.g. {missing[0]})" if missing else "")
            + (f", {len(other)} of another shape: {shapes}" if other else "")
        )
    model.load_state_dict({**model.state_dict(), **{k: encoder[k] for k in backbone}})


def scores_at(
    model: Ranker, imgs: torch.Tensor, visible: torch.Tensor, *, training: Training = "asymmetric"
) -> torch.Tensor:
    """The ranker's scores of the scored positions, as it trains.

    Args:
        imgs: (B, 3, S, S), normalised like the MAE's inputs.
        visible: (B, n) the scored positions.
        training: asymmetric (the authors'): the ranker sees CLS + the n scored patches; symmetric: it
            sees all L patches, as at inference, and only the n scored positions' scores are returned.

    Returns:
        (B, n) scores aligned with `visible`.
    """
    if training == "asymmetric":
        return model(imgs, visible)
    return model(imgs).gather(1, visible)


def rank(model: Ranker, images: torch.Tensor) -> torch.Tensor:
    """images: (B, 3, S, S) normalised -> (B, L) patch scores, every patch seen (inference mode)."""
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        scores = model(images)
    model.train(was_training)
    return scores


def keep_top(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """scores: (B, L) -> indices of the top round(ratio * L) patches of each row, in raster order
    (ascending), ready to gather tokens with. At least one patch is kept."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"keep ratio must be in (0, 1], got {ratio}")
    k = max(1, round(ratio * scores.shape[1]))
    return scores.topk(k, dim=1).indices.sort(dim=1).values
