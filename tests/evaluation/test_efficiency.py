"""The cheaper-ViT benchmark's parts on a tiny timm ViT (CPU)."""

from __future__ import annotations

import copy

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from ltrp.core.baselines import CenterScorer
from ltrp.core.pruned import TokenScorer
from ltrp.evaluation import efficiency
from ltrp.evaluation.efficiency import FitSettings, Method


def _vit(classes: int = 2) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(
        img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=classes
    )


@pytest.mark.parametrize(
    "method",
    [
        Method("center", "top-k", CenterScorer(4), keep=1.0),
        Method("tome", "tome", r=0),
        Method("center", "top-k+tome", CenterScorer(4), keep=1.0, r=0),
    ],
    ids=["top-k keeping all", "tome r=0", "top-k+tome keeping all, r=0"],
)
def test_methods_that_drop_nothing_are_the_full_model(method: Method) -> None:
    model, images = _vit().eval(), torch.randn(5, 3, 16, 16)
    full = efficiency.outputs(model, images, Method("full", "full"))
    torch.testing.assert_close(efficiency.outputs(model, images, method), full, atol=1e-5, rtol=1e-5)


def test_fine_tuning_on_kept_tokens_learns_what_the_kept_tokens_show() -> None:
    # The class is written in the centre 2 x 2 patches only: kept by the centre selector, while the
    # inverted one keeps the four corners, which show noise alone.
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(256, 3, 16, 16, generator=generator) * 0.1
    labels = torch.randint(0, 2, (256,), generator=generator)
    images[:, :, 4:12, 4:12] += (labels.float() * 2 - 1).view(-1, 1, 1, 1)
    centre = CenterScorer(4)
    settings = FitSettings(epochs=3, batch_size=32, lr=3e-3)
    accuracy = {}
    for name, selector in {"centre": centre, "corners": lambda x: -centre(x)}.items():
        method = Method(name, "top-k", selector, keep=0.25)
        tuned = efficiency.fine_tuned(_vit(), images, labels, settings, method)
        accuracy[name] = efficiency.score(efficiency.outputs(tuned, images, method), labels)
    assert accuracy["centre"] > 0.95 and accuracy["corners"] < 0.75, accuracy


def test_multi_label_targets_are_scored_by_map() -> None:
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert efficiency.score(torch.tensor([[5.0, -5.0], [-5.0, 5.0], [4.0, 4.0]]), targets) == 1.0


def test_fine_tuning_through_tome_trains_the_model() -> None:
    model, images, labels = _vit(), torch.randn(64, 3, 16, 16), torch.randint(0, 2, (64,))
    before = copy.deepcopy(model.state_dict())
    efficiency.fit(model, images, labels, FitSettings(epochs=1, batch_size=32), Method("tome", "tome", r=3))
    assert all(not torch.equal(before[k], v) for k, v in model.state_dict().items() if k.startswith("blocks"))


@pytest.mark.parametrize("kind", ["multi-label", "single-label"])
def test_chance_is_what_random_outputs_score(kind: str) -> None:
    generator = torch.Generator().manual_seed(0)
    if kind == "multi-label":
        targets = (torch.rand(4000, 5, generator=generator) < torch.tensor([0.1, 0.2, 0.3, 0.5, 0.0])).float()
        scores = [efficiency.score(torch.randn(4000, 5, generator=generator), targets) for _ in range(5)]
    else:
        targets = torch.cat([torch.zeros(600), torch.ones(300), torch.full((100,), 2)]).long()
        scores = [efficiency.score(torch.tensor([[1.0, 0.0, 0.0]]).expand(1000, -1), targets)]  # the majority
    assert abs(sum(scores) / len(scores) - efficiency.chance(targets)) < 0.01


def test_fine_tuning_a_shared_first_block_method_leaves_that_block_as_it_was() -> None:
    model, images, labels = _vit(), torch.randn(64, 3, 16, 16), torch.randint(0, 2, (64,))
    method = Method("ltrp-shared", "shared", TokenScorer(32).eval(), keep=0.5)
    tuned = efficiency.fine_tuned(model, images, labels, FitSettings(epochs=1, batch_size=32), method)
    before, after = model.state_dict(), tuned.state_dict()
    for key in before:
        frozen = key.startswith(("patch_embed", "cls_token", "pos_embed", "blocks.0."))
        assert torch.equal(before[key], after[key]) == frozen, key


def test_a_token_scorer_learns_the_order_of_the_pseudo_scores() -> None:
    # Pseudo-scores that the first block's tokens can tell: each patch's mean brightness.
    generator = torch.Generator().manual_seed(0)
    model = _vit().eval()
    images = torch.randn(512, 3, 16, 16, generator=generator)
    brightness = images.mean(1).unfold(1, 4, 4).unfold(2, 4, 4).mean((-1, -2)).flatten(1)  # (N, 16)
    visible = torch.stack([torch.randperm(16, generator=generator)[:6] for _ in range(512)])
    scores = brightness.gather(1, visible)
    scorer = TokenScorer(32)
    train, test = slice(0, 448), slice(448, None)
    before = efficiency.token_scorer_tau(model, scorer, images[test], visible[test], scores[test])
    settings = FitSettings(epochs=20, batch_size=64, lr=3e-3)
    efficiency.fit_token_scorer(model, scorer, images[train], visible[train], scores[train], settings)
    after = efficiency.token_scorer_tau(model, scorer, images[test], visible[test], scores[test])
    assert after > 0.4 and after > before + 0.4, (before, after)


def test_throughputs_times_every_run() -> None:
    rates = efficiency.throughputs(
        {"a": lambda x: x * 2, "b": lambda x: x.sum()}, torch.ones(10, 3), 4, rounds=2
    )
    assert set(rates) == {"a", "b"} and all(r > 0 for r in rates.values())
