"""A small ViT classifier that sees only some patches of each image, for the evaluation.

It does two jobs: the *supervised selector* (trained with labels on every patch; its last block's CLS
attention ranks patches, the kind of selector the LTRP paper calls category-biased), and the probe of
"classification on kept tokens" (trained and tested on the patches a scorer keeps, nothing else).

Shapes: S = img_size, p = patch_size, L = (S/p)^2 patches, k kept patches, D = width, C classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ltrp.core.vit import PatchGrid, ViTEncoder


@dataclass(frozen=True)
class ClassifierConfig(PatchGrid):
    embed_dim: int = 64
    depth: int = 2
    num_heads: int = 4
    epochs: int = 6
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05


class PatchClassifier(ViTEncoder):
    """imgs (B, 3, S, S) and the patches it may see (B, k) -> class logits (B, C)."""

    def __init__(self, cfg: ClassifierConfig, num_classes: int) -> None:
        super().__init__(
            cfg.img_size, cfg.patch_size, 3, cfg.embed_dim, cfg.depth, cfg.num_heads, 4.0, norm_eps=1e-6
        )
        self.cfg = cfg
        self.head = nn.Linear(cfg.embed_dim, num_classes)
        self._init_weights()

    def forward(self, imgs: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        """imgs: (B, 3, S, S), visible: (B, k) or None for all L -> logits (B, C), from the CLS token."""
        return self.head(self.encode(imgs, visible)[:, 0])


def fit_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    cfg: ClassifierConfig,
    visible: torch.Tensor | None = None,
    seed: int = 0,
) -> PatchClassifier:
    """Trains a PatchClassifier from scratch on the given patches of each image.

    Args:
        images: (N, 3, S, S) normalised model inputs.
        labels: (N,) class indices in [0, num_classes).
        num_classes: C.
        cfg: geometry, width and optimisation settings.
        visible: (N, k) the patches each image may show (one fixed set per image), or None for all.
        seed: seeds the initialisation and the batch order.

    Returns:
        The trained classifier, in eval mode.
    """
    torch.manual_seed(seed)
    model = PatchClassifier(cfg, num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = -(-len(images) // cfg.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=0.1
    )
    model.train()
    for _ in range(cfg.epochs):
        for idx in torch.randperm(len(images)).split(cfg.batch_size):
            logits = model(images[idx], None if visible is None else visible[idx])
            loss = F.cross_entropy(logits, labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


@torch.inference_mode()
def predict(
    model: PatchClassifier, images: torch.Tensor, visible: torch.Tensor | None = None, batch_size: int = 512
) -> torch.Tensor:
    """images: (N, 3, S, S), visible: (N, k) or None -> predicted classes (N,)."""
    out = []
    for idx in torch.arange(len(images)).split(batch_size):
        out.append(model(images[idx], None if visible is None else visible[idx]).argmax(dim=1))
    return torch.cat(out)
