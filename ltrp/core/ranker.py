"""The LTRP ranker: a ViT that scores every patch position of an image, no MAE.

The authors' head is one Linear(D -> L) on the final CLS token: a score per patch *position*. The
per-token variant scores each token from its own output. The authors' training is asymmetric: the
ranker sees only CLS + the n scored visible patches, while at inference it sees all L patches; the
symmetric variant trains as it infers, on all L patches with the loss at the n scored positions.
Beyond the paper, an asymmetric ranker can also rank as it trained (`rank`): in random sets of n
patches, the scores standardised per set and averaged over rounds, as the full-coverage oracle averages
its leave-one-out rounds (docs/method.md).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from ltrp.core.options import ROUNDS, Head, Training
from ltrp.core.vit import PatchGrid, ViTEncoder, gather_tokens


@dataclass(frozen=True)
class RankerConfig(PatchGrid):
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    head: Head = "cls"
    #: The patches per view it learned to order (asymmetric training: the score table's n, 19 of 196 at
    #: mask ratio 0.9): it then ranks in sets of that size. None: it ranks seeing every patch at once.
    set_size: int | None = None


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
        tokens = self.embed_patches(imgs)
        return self.score_seen(tokens if visible is None else gather_tokens(tokens, visible), visible)

    def score_seen(self, tokens: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        """`forward` from the embedded patches it sees: tokens (B, n, D) at positions `visible` (B, n), or
        (B, L, D) in raster order with `visible` None -> (B, n) or (B, L) scores."""
        out = self.encode_tokens(tokens)  # (B, 1 + n, D)
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


def rank(model: Ranker, images: torch.Tensor, rounds: int = ROUNDS) -> torch.Tensor:
    """Patch scores of whole images (inference mode); larger = keep.

    A ranker that learned to order sets of n patches (`cfg.set_size`, asymmetric training) ranks as it
    learned: each of `rounds` rounds splits the L positions into sets of n at random (`partitions`), the
    ranker scores each set seeing CLS and those n patches only, each set's scores are standardised (the
    ranking loss fixes neither their level nor their scale), and a position's score is its mean over the
    sets that held it. Otherwise (`set_size` None, or `rounds` 0) one pass seeing every patch, the
    paper's inference.

    Args:
        images: (B, 3, S, S), normalised like the MAE's inputs.
        rounds: random partitions averaged; each costs about one forward pass of L tokens.

    Returns:
        (B, L) scores in raster order.
    """
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        if model.cfg.set_size is None or rounds == 0:
            scores = model(images)
        else:
            scores = _rank_in_sets(
                model, images, partitions(model.cfg.num_patches, model.cfg.set_size, rounds)
            )
    model.train(was_training)
    return scores


def partitions(num_patches: int, set_size: int, rounds: int, seed: int = 0) -> torch.Tensor:
    """(rounds, S, n) sets of positions: each round a random order of the L positions cut into
    S = ceil(L / n) sets of n, the last set the order's final n (so it repeats a few positions). Fixed
    by `seed`, the same for every image: an image's ranks do not depend on its batch."""
    if not 2 <= set_size <= num_patches:  # one patch has no order to learn or to standardise
        raise ValueError(f"set_size must be in [2, {num_patches}], got {set_size}")
    generator = torch.Generator().manual_seed(seed)
    starts = [*range(0, num_patches - set_size, set_size), num_patches - set_size]
    orders = [torch.randperm(num_patches, generator=generator) for _ in range(rounds)]
    return torch.stack([torch.stack([o[s : s + set_size].sort().values for s in starts]) for o in orders])


def _rank_in_sets(model: Ranker, images: torch.Tensor, sets: torch.Tensor) -> torch.Tensor:
    """images (B, 3, S, S), sets (R, S', n) -> (B, L): each position's mean standardised score."""
    b, (_, count, n) = len(images), sets.shape
    tokens = model.embed_patches(images)  # (B, L, D): embedded once for every set
    total = torch.zeros(b, model.cfg.num_patches, device=images.device)
    for round_sets in sets.to(images.device):  # one round at a time bounds the memory: B * S' sequences
        seen = gather_tokens(tokens, round_sets.flatten().expand(b, -1)).view(b * count, n, -1)
        visible = round_sets.repeat(b, 1)  # (B * S', n): image i's sets are rows i * S' .. (i + 1) * S' - 1
        scores = model.score_seen(seen, visible).float()
        scores = (scores - scores.mean(1, keepdim=True)) / scores.std(1, keepdim=True).clamp_min(1e-6)
        total.scatter_add_(1, visible.view(b, count * n), scores.view(b, count * n))
    times = torch.bincount(sets.flatten(), minlength=model.cfg.num_patches)  # the same for every image
    return total / times.to(total)


def keep_top(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """scores: (B, L) -> indices of the top round(ratio * L) patches of each row, in raster order
    (ascending), ready to gather tokens with. At least one patch is kept."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"keep ratio must be in (0, 1], got {ratio}")
    k = max(1, round(ratio * scores.shape[1]))
    return scores.topk(k, dim=1).indices.sort(dim=1).values
