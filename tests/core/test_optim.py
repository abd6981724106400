"""The optimiser set-up both training jobs share: the learning-rate schedule and AdamW's groups."""

import itertools
import math

import pytest
import torch

from ltrp.core.optim import lr_at, param_groups
from ltrp.core.ranker import RANKER_GEOMETRIES, Ranker

BASE, WARMUP, TOTAL = 1e-3, 10, 110  # 100 steps of cosine


def test_warmup_is_linear_and_reaches_the_base_rate_at_its_end() -> None:
    warmup = [lr_at(step, TOTAL, WARMUP, BASE) for step in range(WARMUP)]
    assert warmup[0] == pytest.approx(BASE / WARMUP)  # the first step already moves
    steps = [b - a for a, b in itertools.pairwise(warmup)]
    assert steps == pytest.approx([BASE / WARMUP] * (WARMUP - 1))  # equal increments: linear
    assert warmup[-1] == pytest.approx(BASE)
    assert lr_at(WARMUP, TOTAL, WARMUP, BASE) == pytest.approx(BASE)  # the cosine starts at the base


def test_cosine_decays_monotonically_to_zero_after_the_warmup() -> None:
    decay = [lr_at(step, TOTAL, WARMUP, BASE) for step in range(WARMUP, TOTAL + 1)]
    assert all(b < a for a, b in itertools.pairwise(decay))
    assert decay[-1] == pytest.approx(0.0, abs=1e-12)
    assert lr_at(TOTAL - 1, TOTAL, WARMUP, BASE) < 1e-3 * BASE  # the last step of training: ~0
    middle = WARMUP + (TOTAL - WARMUP) // 2
    assert lr_at(middle, TOTAL, WARMUP, BASE) == pytest.approx(BASE / 2)  # cosine, not linear
    expected = 0.5 * BASE * (1 + math.cos(math.pi * 0.25))
    assert lr_at(WARMUP + (TOTAL - WARMUP) // 4, TOTAL, WARMUP, BASE) == pytest.approx(expected)


def test_without_warmup_training_starts_at_the_base_rate() -> None:
    assert lr_at(0, TOTAL, 0, BASE) == pytest.approx(BASE)


def test_weight_decay_on_weight_matrices_only_not_on_norms_biases_and_tokens() -> None:
    model = Ranker(RANKER_GEOMETRIES["ltrp_vit_micro_patch8"])
    decay, rest = param_groups(model, 0.05)
    assert (decay["weight_decay"], rest["weight_decay"]) == (0.05, 0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in rest["params"]}
    assert decayed and not decayed & kept
    assert all(n.endswith(".weight") and "norm" not in n for n in decayed)
    assert {
        "cls_token",
        "norm.weight",
        "norm.bias",
        "blocks.0.norm1.weight",
        "blocks.0.attn.qkv.bias",
    } <= kept
    assert {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight"} <= decayed
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decayed | kept == trainable  # every trained parameter in exactly one group ...
    assert "pos_embed" not in trainable  # ... and the fixed sin-cos positions in none


def test_groups_drive_adamw() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    assert [len(g["params"]) for g in optimizer.param_groups] == [1, 3]  # Linear.weight | bias, norm
