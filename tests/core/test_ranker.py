import numpy as np
import pytest
import torch
from support import fashion_mnist, png_bytes

import ltrp
from ltrp.core.losses import listmle
from ltrp.core.ranker import (
    RANKER_GEOMETRIES,
    Ranker,
    RankerConfig,
    init_from_encoder,
    keep_top,
    partitions,
    rank,
    scores_at,
)
from ltrp.data.images import center_crop, to_model_input

MICRO = RANKER_GEOMETRIES["ltrp_vit_micro_patch8"]


@pytest.mark.parametrize("head", ["cls", "token"])
def test_scores_have_one_value_per_position_seen(head: str) -> None:
    torch.manual_seed(0)
    model = Ranker(RankerConfig(**{**MICRO.__dict__, "head": head})).eval()
    imgs = torch.randn(2, 3, 64, 64)
    visible = ltrp.visible_sets(["a", "b"], grid=8, mask_ratio=0.75)
    assert model(imgs).shape == (2, 64)
    assert model(imgs, visible).shape == (2, 16)
    if head == "cls":
        # The CLS head scores positions: seeing fewer patches changes the scores, not the layout. The
        # scores of the seen patches are the head's full row of L scores at exactly those positions.
        with torch.no_grad():
            every_position = model.head(model.encode(imgs, visible)[:, 0])  # (2, 64) from the 16 seen
            seen, full = model(imgs, visible), model(imgs)
        assert torch.equal(seen, every_position.gather(1, visible))
        assert not torch.allclose(seen, full.gather(1, visible), atol=1e-3)
        # Scores follow the positions named, not their order: permuting `visible` permutes the scores.
        perm = torch.randperm(visible.shape[1])
        torch.testing.assert_close(model(imgs, visible[:, perm]), seen[:, perm], rtol=1e-5, atol=1e-5)


def test_vit_small_has_about_21m_parameters() -> None:
    with torch.device("meta"):
        model = Ranker(RANKER_GEOMETRIES["ltrp_vit_small_patch16"])
    assert 21e6 < sum(p.numel() for p in model.parameters() if p.requires_grad) < 22.5e6


@pytest.mark.parametrize("training", ["asymmetric", "symmetric"])
def test_gradients_reach_only_the_scored_positions(training: str) -> None:
    torch.manual_seed(0)
    model = Ranker(MICRO)
    visible = ltrp.visible_sets(["a", "b"], grid=8, mask_ratio=0.9)
    imgs = torch.randn(2, 3, 64, 64, requires_grad=True)
    s = scores_at(model, imgs, visible, training=training)
    assert s.shape == visible.shape
    listmle(s, torch.rand(2, visible.shape[1])).backward()
    rows = model.head.weight.grad.abs().sum(dim=1)
    scored = torch.zeros(64, dtype=torch.bool)
    scored[visible.flatten()] = True
    assert (rows[~scored] == 0).all() and (rows[scored] > 0).all()
    # The symmetric ranker sees every patch: the loss depends on unscored pixels too; the asymmetric
    # one sees the scored patches only.
    pixel_grad = imgs.grad.abs().sum(dim=(0, 1))  # (64, 64)
    per_patch = pixel_grad.reshape(8, 8, 8, 8).sum(dim=(1, 3)).flatten()  # (64,) raster patch order
    seen = scored if training == "asymmetric" else torch.ones(64, dtype=torch.bool)
    assert (per_patch[seen] > 0).all() and (per_patch[~seen] == 0).all()


@pytest.mark.parametrize("training", ["asymmetric", "symmetric"])
def test_a_tiny_ranker_overfits_a_tiny_real_score_table(training: str) -> None:
    images, _ = fashion_mnist(8)
    pixels = np.stack([center_crop(png_bytes(img), 64) for img in images])
    x = to_model_input(pixels)
    visible = ltrp.visible_sets(range(8), grid=8, mask_ratio=0.75)
    torch.manual_seed(0)
    mae = ltrp.MAE(ltrp.GEOMETRIES["mae_vit_tiny_patch8"]).eval()
    y = ltrp.loo_scores(mae, x, visible)  # real pseudo-scores of real images
    model = Ranker(MICRO)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss = listmle(scores_at(model, x, visible, training=training), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


def test_rank_and_keep_top() -> None:
    torch.manual_seed(0)
    model = Ranker(MICRO).train()
    scores = rank(model, torch.randn(3, 3, 64, 64))
    assert scores.shape == (3, 64) and model.training
    kept = keep_top(scores, 0.25)
    assert kept.shape == (3, 16) and (kept.diff(dim=1) > 0).all()
    best = scores.argmax(dim=1)
    assert all(b in row for b, row in zip(best.tolist(), kept.tolist(), strict=True))
    assert keep_top(scores, 0.001).shape == (3, 1)
    with pytest.raises(ValueError, match="keep ratio"):
        keep_top(scores, 0.0)


@pytest.mark.parametrize(("patches", "n"), [(64, 16), (196, 19), (10, 10)])
def test_each_round_splits_every_position_into_sets_of_n(patches: int, n: int) -> None:
    sets = partitions(patches, n, rounds=3)
    assert sets.shape == (3, -(-patches // n), n)
    for round_sets in sets:
        assert set(round_sets.flatten().tolist()) == set(range(patches))
        assert all(len(set(s)) == n and s == sorted(s) for s in round_sets.tolist())
    assert torch.equal(sets, partitions(patches, n, rounds=3))  # fixed: an image's ranks never vary
    if n < patches:
        assert not torch.equal(sets, partitions(patches, n, rounds=3, seed=1))
    with pytest.raises(ValueError, match="set_size"):
        partitions(patches, 1, rounds=1)


def test_a_ranker_trained_on_sets_ranks_in_sets_as_a_per_set_loop_does() -> None:
    """`rank` against a reference that scores one image and one set at a time: the ranker sees CLS and
    the set's patches only, the set's scores are standardised, each position averages its sets."""
    torch.manual_seed(0)
    model = Ranker(RankerConfig(**{**MICRO.__dict__, "set_size": 12}))
    images = torch.randn(3, 3, 64, 64)
    expected = torch.zeros(3, 64)
    with torch.no_grad():
        for i, image in enumerate(images):
            total, times = torch.zeros(64), torch.zeros(64)
            for visible in partitions(64, 12, rounds=2).flatten(0, 1):
                s = model.eval()(image[None], visible[None])[0]
                total[visible] += (s - s.mean()) / s.std()
                times[visible] += 1
            expected[i] = total / times
    scores = rank(model, images, rounds=2)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rank(model, images[1:2], rounds=2), scores[1:2])  # not batch-dependent
    assert not torch.allclose(rank(model, images, rounds=3), scores, atol=1e-3)  # a third round counts


def test_without_sets_the_ranker_ranks_in_one_pass_seeing_every_patch() -> None:
    torch.manual_seed(0)
    images = torch.randn(2, 3, 64, 64)
    one_pass = Ranker(MICRO).eval()  # set_size None: trained symmetric, or by an older ltrp
    in_sets = Ranker(RankerConfig(**{**MICRO.__dict__, "set_size": 16})).eval()
    in_sets.load_state_dict(one_pass.state_dict())
    with torch.no_grad():
        full = one_pass(images)
    assert torch.equal(rank(one_pass, images), full)
    assert torch.equal(rank(in_sets, images, rounds=0), full)
    assert not torch.allclose(rank(in_sets, images), full, atol=1e-3)
    with pytest.raises(ValueError, match="rounds"):
        rank(in_sets, images, rounds=-1)


@pytest.mark.parametrize(
    ("mae", "ranker"),
    [
        ("mae_vit_tiny_patch8", "ltrp_vit_micro_patch8"),
        ("mae_vit_scenes_patch4", "ltrp_vit_scenes_mae_patch4"),
    ],
)
def test_a_ranker_starts_from_an_mae_encoder_with_a_new_head(mae: str, ranker: str) -> None:
    torch.manual_seed(0)
    mae_model = ltrp.MAE(ltrp.GEOMETRIES[mae]).eval()
    encoder = mae_model.state_dict()
    model = Ranker(RANKER_GEOMETRIES[ranker]).eval()
    head = {k: v.clone() for k, v in model.head.state_dict().items()}
    init_from_encoder(model, encoder)
    state = model.state_dict()
    backbone = [k for k in state if not k.startswith("head.")]
    assert backbone and all(torch.equal(state[k], encoder[k]) for k in backbone)
    assert all(torch.equal(model.head.state_dict()[k], v) for k, v in head.items())  # the head stays new
    imgs = torch.randn(2, 3, model.cfg.img_size, model.cfg.img_size)
    with torch.no_grad():  # the MAE encoder's features, every patch seen
        assert torch.equal(model.encode(imgs), mae_model.encode(imgs))


def test_an_encoder_of_another_geometry_is_refused_and_nothing_copied() -> None:
    torch.manual_seed(0)
    model = Ranker(RANKER_GEOMETRIES["ltrp_vit_scenes_patch4"])  # 96 wide; the scenes MAE is 128
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"does not fit the ranker's backbone \(96 wide.*of another shape"):
        init_from_encoder(model, ltrp.MAE(ltrp.GEOMETRIES["mae_vit_scenes_patch4"]).state_dict())
    with pytest.raises(ValueError, match=r"tensor\(s\) missing \(e.g. blocks.0"):
        init_from_encoder(model, {"cls_token": before["cls_token"]})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
