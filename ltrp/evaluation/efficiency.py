"""Cheaper vision transformers, measured: a timm ViT's accuracy against its throughput when it runs on the
top-k patches of a selector (a ranker, random, centre, a pixel statistic) or merges tokens with ToMe.

A method maps a batch of images to the model's outputs; its throughput is measured over the whole test
set, selector included (a ranker's own forward is part of LTRP's cost), each method timed in turn and
the rounds repeated, so all methods share one machine state. Accuracy: top-1 for single-label data,
mAP for multi-label data.

Shapes: N images, S pixels, L patches, C classes.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ltrp.core.losses import listmle
from ltrp.core.probe import mean_average_precision
from ltrp.core.pruned import (
    TokenScorer,
    first_block_patches,
    forward_kept,
    forward_shared,
    forward_tome,
    shared_parameters,
)
from ltrp.core.ranker import keep_top
from ltrp.core.ranking_metrics import kendall_tau

#: images (B, 3, S, S) -> patch scores (B, L); larger = keep
Selector = Callable[[torch.Tensor], torch.Tensor]
Kind = Literal["full", "top-k", "tome", "top-k+tome", "shared"]


@dataclass(frozen=True)
class Method:
    """One way to run the model: every token ("full"), the top `keep` fraction of `selector`'s patches
    ("top-k"), ToMe merging `r` tokens per block ("tome"), ToMe on the top-k ("top-k+tome"), or the
    top `keep` by a `TokenScorer` of the model's own first block ("shared")."""

    name: str  # the selector's name for top-k ("ltrp-...", "random", ...), "full" or "tome"
    kind: Kind
    selector: Selector | TokenScorer | None = None
    keep: float = 1.0
    r: int = 0

    @property
    def label(self) -> str:
        top_k = f"{self.name} keep {self.keep:.0%}"
        return {
            "full": "full",
            "top-k": top_k,
            "shared": top_k,
            "tome": f"tome r={self.r}",
            "top-k+tome": f"{top_k} + tome r={self.r}",
        }[self.kind]

    def __call__(self, model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
        """(B, C) the model's outputs on images (B, 3, S, S); differentiable through the model only."""
        if self.kind == "full":
            return model(images)
        if self.kind == "shared":  # the first block runs once: its tokens choose, then go on
            return forward_shared(model, self.selector, images, self.keep)
        keep = self.kept(model, images)
        if self.kind == "top-k":
            return forward_kept(model, images, keep)
        return forward_tome(model, images, self.r, keep)

    def kept(self, model: VisionTransformer, images: torch.Tensor) -> torch.Tensor | None:
        """(B, k) the patch positions this method keeps of images (B, 3, S, S); None when it keeps all."""
        with torch.no_grad():  # the selector is fixed: fine-tuning trains the model alone
            if self.kind in ("top-k", "top-k+tome"):
                return keep_top(self.selector(images), self.keep)
            if self.kind == "shared":
                tokens = first_block_patches(model, images)
                return keep_top(self.selector(tokens), self.keep)
        return None


@dataclass(frozen=True)
class FitSettings:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    seed: int = 0


def fit(
    model: VisionTransformer,
    images: torch.Tensor,
    targets: torch.Tensor,
    settings: FitSettings,
    method: Method | None = None,
    after_epoch: Callable[[int, VisionTransformer], None] | None = None,
) -> VisionTransformer:
    """Trains `model` in place on all tokens, or fine-tunes it as `method` runs it (top-k: on the
    selector's patches, chosen afresh for each batch, so a random selector draws a new set every step;
    ToMe: through its merging). AdamW, one-cycle schedule.

    Args:
        images: (N, 3, S, S) model inputs.
        targets: (N,) class indices (cross-entropy) or (N, C) multi-hot floats (binary cross-entropy).
        method: None for all tokens, or any method.
        after_epoch: called with the epoch's number (from 1) and the model after each epoch, e.g. to
            validate; the model is back in training mode when it returns.

    Returns:
        The model, in eval mode.
    """
    loss_fn = F.binary_cross_entropy_with_logits if targets.dim() == 2 else F.cross_entropy
    run = method or Method("full", "full")

    def epoch_done(epoch: int) -> None:
        if after_epoch:
            after_epoch(epoch, model.eval())
        model.train()

    model.train()
    _train(
        model.parameters(), lambda idx: loss_fn(run(model, images[idx]), targets[idx]), len(images), settings,
        epoch_done,
    )  # fmt: skip
    return model.eval()


def _train(
    parameters: Iterable[nn.Parameter],
    batch_loss: Callable[[torch.Tensor], torch.Tensor],
    count: int,
    settings: FitSettings,
    after_epoch: Callable[[int], None] = lambda _: None,
) -> None:
    """AdamW on `parameters` with a one-cycle schedule: each epoch, `batch_loss` of every batch of
    indices into the `count` examples (shuffled), then `after_epoch` with the epoch's number (from 1)."""
    torch.manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=settings.weight_decay)
    steps = settings.epochs * -(-count // settings.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, settings.lr, total_steps=steps, pct_start=0.1)
    for epoch in range(1, settings.epochs + 1):
        for idx in torch.randperm(count).split(settings.batch_size):
            loss = batch_loss(idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        after_epoch(epoch)


def fine_tuned(
    model: VisionTransformer,
    images: torch.Tensor,
    targets: torch.Tensor,
    settings: FitSettings,
    method: Method,
) -> VisionTransformer:
    """A copy of `model` fine-tuned on the tokens `method` keeps (the original is untouched). With a
    "shared" method the first block and the embedding stay as they are: its scorer learned their tokens."""
    tuned = copy.deepcopy(model)
    if method.kind == "shared":
        for p in shared_parameters(tuned):
            p.requires_grad_(False)
    return fit(tuned, images, targets, settings, method)


def fit_token_scorer(
    model: VisionTransformer,
    scorer: TokenScorer,
    images: torch.Tensor,
    visible: torch.Tensor,
    scores: torch.Tensor,
    settings: FitSettings,
) -> TokenScorer:
    """Trains `scorer` in place to order each view's scored patches as LTRP's pseudo-scores do (ListMLE,
    the paper's loss), from the frozen `model`'s first-block tokens of the whole view. AdamW, one-cycle.

    Args:
        images: (N, 3, S, S) the scored views, as the model takes them.
        visible: (N, n) the positions each view's scores belong to; scores: (N, n) their pseudo-scores.

    Returns:
        The scorer, in eval mode.
    """

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            tokens = first_block_patches(model, images[idx])
        return listmle(scorer(tokens).gather(1, visible[idx]), scores[idx])

    model.eval()
    scorer.train()
    _train(scorer.parameters(), batch_loss, len(images), settings)
    return scorer.eval()


@torch.inference_mode()
def token_scorer_tau(
    model: VisionTransformer,
    scorer: TokenScorer,
    images: torch.Tensor,
    visible: torch.Tensor,
    scores: torch.Tensor,
) -> float:
    """Mean Kendall tau between `scorer`'s scores and the pseudo-scores over the views' scored patches
    (the ranker's validation measure)."""
    tokens = first_block_patches(model, images)
    return float(kendall_tau(scorer(tokens).gather(1, visible), scores).mean())


@torch.inference_mode()
def outputs(
    model: VisionTransformer, images: torch.Tensor, method: Method, batch_size: int = 256
) -> torch.Tensor:
    """(N, C) the model's outputs on `images`, run as `method` runs it."""
    return torch.cat([method(model, x) for x in images.split(batch_size)])


def score(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-1 accuracy for (N,) class targets, mAP for (N, C) multi-hot targets."""
    if targets.dim() == 2:
        return mean_average_precision(logits.sigmoid(), targets)
    return float((logits.argmax(dim=1) == targets).float().mean())


def chance(targets: torch.Tensor) -> float:
    """The score of a model that ignores the image: for (N, C) multi-hot targets the expected mAP of
    random scores (each class's AP is then its prevalence), for (N,) classes the largest class's share."""
    if targets.dim() == 2:
        prevalence = targets.float().mean(dim=0)
        return float(prevalence[prevalence > 0].mean())
    return float(targets.bincount().max() / len(targets))


@torch.inference_mode()
def throughputs(
    runs: dict[str, Callable[[torch.Tensor], torch.Tensor]],
    images: torch.Tensor,
    batch_size: int = 256,
    rounds: int = 3,
) -> dict[str, float]:
    """Images per second of each named run over `images` in batches: the median of `rounds` rounds,
    each of which times every run once in turn (after one untimed warm-up batch each), so that all
    runs share the machine's state. On a GPU (images on CUDA) each timing waits for the device."""
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    batches = list(images.split(batch_size))
    sync = torch.cuda.synchronize if images.is_cuda else lambda: None  # kernels run asynchronously
    for run in runs.values():
        run(batches[0])  # warm-up: allocator, thread pool, first-call paths, CUDA kernels
    for _ in range(rounds):
        for name, run in runs.items():
            sync()
            start = time.perf_counter()
            for x in batches:
                run(x)
            sync()
            seconds[name].append(time.perf_counter() - start)
    return {name: len(images) / statistics.median(s) for name, s in seconds.items()}


def random_selector(num_patches: int, seed: int) -> Selector:
    """Uniform random scores, drawn afresh on every call (a new set per step and per batch)."""
    generator = torch.Generator().manual_seed(seed)
    return lambda images: torch.rand(images.shape[0], num_patches, generator=generator).to(images.device)
