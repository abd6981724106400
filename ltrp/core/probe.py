"""Multi-label classifiers on kept tokens, initialised from the MAE's encoder.

Two uses in the evaluation: the *probe* (fine-tuned and tested on the patches a selector keeps, nothing
else: how much of what a scene shows survives the selection), and the *supervised selector* (fine-tuned
with labels of the seen classes on every patch; its CLS attention ranks patches: the category-biased
kind of selector). Both start from the MAE's encoder, so they differ from each other and across
selectors only in what they are trained on.

Shapes: S = img_size, L = patches, k kept, C classes, D = width.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ltrp.core.mae import MAE
from ltrp.core.optim import param_groups
from ltrp.core.vit import ViTEncoder

#: Keep sets for a batch: a fixed (N, k) tensor indexed by the batch, or a function of the batch's
#: indices that draws new ones (the random baseline draws a fresh set every step, as the authors do).
KeepSets = torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None


class Probe(ViTEncoder):
    """imgs (B, 3, S, S) and the patches it may see (B, k) -> multi-label logits (B, C), from the CLS
    token (so that its last block's CLS attention is what the labels trained)."""

    def __init__(self, mae: MAE, num_classes: int) -> None:
        cfg = mae.cfg
        super().__init__(**cfg.encoder)
        self.head = nn.Linear(cfg.embed_dim, num_classes)
        nn.init.zeros_(self.head.bias)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        result = self.load_state_dict(mae.encoder_state(), strict=False)  # strict but for the new head:
        if set(result.missing_keys) != {"head.weight", "head.bias"} or result.unexpected_keys:
            raise ValueError(f"MAE encoder does not fit the probe: {result}")

    def forward(self, imgs: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.encode(imgs, visible)[:, 0])


@dataclass(frozen=True)
class ProbeSettings:
    epochs: int = 10  # at most; training stops early when validation mAP stops improving
    patience: int = 2  # epochs without a better validation mAP before stopping
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.05


def fit_probe(
    mae: MAE,
    images: torch.Tensor,
    targets: torch.Tensor,
    keep: KeepSets,
    settings: ProbeSettings,
    seed: int,
    val: tuple[torch.Tensor, torch.Tensor, KeepSets] | None = None,
) -> tuple[Probe, list[float]]:
    """Fine-tunes a probe from the MAE's encoder with binary cross-entropy.

    Args:
        images: (N, 3, S, S) normalised; targets: (N, C) in {0, 1}.
        keep: the patches each image shows (`KeepSets`), None for all.
        seed: seeds the head, the batch order and any drawn keep sets.
        val: (images, targets, keep) for early stopping on mAP; None: train all epochs.

    Returns:
        (the probe at its best validation mAP, in eval mode; validation mAP after each epoch).
    """
    torch.manual_seed(seed)
    model = Probe(mae, targets.shape[1])
    optimizer = torch.optim.AdamW(param_groups(model, settings.weight_decay), lr=settings.lr)
    best, best_state, history = -1.0, None, []
    for _ in range(settings.epochs):
        model.train()
        for idx in torch.randperm(len(images)).split(settings.batch_size):
            logits = model(images[idx], _keep_for(keep, idx))
            loss = F.binary_cross_entropy_with_logits(logits, targets[idx].float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if val is None:
            continue
        history.append(mean_average_precision(predict_probe(model, val[0], val[2]), val[1]))
        if history[-1] > best:
            best, best_state = history[-1], {k: v.clone() for k, v in model.state_dict().items()}
        elif len(history) - 1 - int(np.argmax(history)) >= settings.patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return model.eval(), history


def _keep_for(keep: KeepSets, idx: torch.Tensor) -> torch.Tensor | None:
    if keep is None or isinstance(keep, torch.Tensor):
        return None if keep is None else keep[idx]
    return keep(idx)


@torch.inference_mode()
def predict_probe(model: Probe, images: torch.Tensor, keep: KeepSets, batch_size: int = 256) -> torch.Tensor:
    """(N, C) sigmoid scores of `images`, each seeing its kept patches."""
    was_training = model.training
    model.eval()
    out = [
        model(images[idx], _keep_for(keep, idx)).sigmoid()
        for idx in torch.arange(len(images)).split(batch_size)
    ]
    model.train(was_training)
    return torch.cat(out)


def average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
    """AP of ranking by `scores` (N,) with binary `positives` (N,): the mean, over the positives, of the
    precision at each positive's rank (ties broken by order, as scikit-learn's does not; the tests
    use untied scores). NaN without positives."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    hits = np.asarray(positives, dtype=bool)[order]
    if not hits.any():
        return float("nan")
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].mean())


def mean_average_precision(scores: torch.Tensor | np.ndarray, targets: torch.Tensor | np.ndarray) -> float:
    """mAP over the classes that have a positive: scores, targets (N, C)."""
    s, t = np.asarray(scores), np.asarray(targets).astype(bool)
    return float(
        np.nanmean([average_precision(s[:, c], t[:, c]) for c in range(t.shape[1]) if t[:, c].any()])
    )
