import pytest
import torch

import ltrp
from ltrp.core.baselines import (
    CenterScorer,
    FolkRComScorer,
    GradientEnergyScorer,
    RandomScorer,
    RankerScorer,
    StratifiedRandomScorer,
    VarianceScorer,
)
from ltrp.core.classifier import ClassifierConfig, PatchClassifier
from ltrp.core.folk import frequency_split
from ltrp.core.ranker import RANKER_GEOMETRIES, Ranker, keep_top


def _scorers(patch: int) -> list:
    torch.manual_seed(0)
    return [
        RandomScorer(patch),
        StratifiedRandomScorer(patch),
        CenterScorer(patch),
        VarianceScorer(patch),
        GradientEnergyScorer(patch),
        FolkRComScorer(patch),
    ]


@pytest.mark.parametrize(("size", "patch"), [(64, 8), (32, 16), (16, 16)])
@pytest.mark.parametrize("kind", ["random", "flat", "tiny-values"])
def test_shape_determinism_and_no_nan(size: int, patch: int, kind: str) -> None:
    images = {
        "random": torch.randn(3, 3, size, size),
        "flat": torch.full((3, 3, size, size), 0.7),
        "tiny-values": torch.randn(3, 3, size, size) * 1e-8,
    }[kind]
    for scorer in _scorers(patch):
        out = scorer(images)
        assert out.shape == (3, (size // patch) ** 2), scorer.name
        assert torch.isfinite(out).all(), scorer.name
        assert torch.equal(out, scorer(images.clone())), scorer.name


def test_ranker_scorer_has_the_interface() -> None:
    torch.manual_seed(0)
    scorer = RankerScorer(Ranker(RANKER_GEOMETRIES["ltrp_vit_micro_patch8"]))
    images = torch.randn(2, 3, 64, 64)
    assert scorer(images).shape == (2, 64) and torch.equal(scorer(images), scorer(images))


def test_content_scorers_prefer_the_textured_patch() -> None:
    images = torch.zeros(1, 3, 32, 32)
    images[..., 16:, :16] = torch.randn(3, 16, 16)  # texture in patch 2 of a 2x2 grid
    for scorer in (VarianceScorer(16), GradientEnergyScorer(16), FolkRComScorer(16)):
        assert scorer(images).argmax().item() == 2, scorer.name
    assert CenterScorer(16)(images).unique().numel() == 1  # 2x2 grid: every patch equally central


def test_rcom_of_a_constant_image_is_zero() -> None:
    images = torch.full((1, 3, 32, 32), 0.3)
    assert frequency_split(images, 0.005)[1].abs().max() < 1e-6
    assert FolkRComScorer(8)(images).abs().max() < 1e-10


def test_variance_is_the_patch_spectral_energy_without_dc() -> None:
    # Parseval: a patch's energy without DC equals its pixel variance times its size.
    patch = torch.randn(1, 1, 8, 8)
    spectrum = torch.fft.fft2(patch).flatten()
    energy_without_dc = (spectrum[1:].abs() ** 2).sum() / 64
    assert VarianceScorer(8)(patch).item() * 64 == pytest.approx(energy_without_dc.item(), rel=1e-5)


def test_variance_scores_a_flat_coloured_patch_zero() -> None:
    images = torch.zeros(1, 3, 16, 16)
    images[0, :, :8, :8] = torch.tensor([2.0, -1.0, 0.5])[:, None, None]  # flat, but a colour
    images[0, :, 8:, 8:] = 0.1 * torch.randn(3, 8, 8)  # faint texture
    scores = VarianceScorer(8)(images)[0]
    assert scores[0] == 0 and scores[3] > 0 and scores.argmax() == 3


def test_folk_averages_taus_on_equal_footing() -> None:
    """Each tau's energies are normalised per image: the score ignores the image's contrast, and
    equals the mean of the single-tau scorers' normalised rankings."""
    images = torch.randn(2, 3, 32, 32)
    folk = FolkRComScorer(8)
    torch.testing.assert_close(folk(images * 10), folk(images))
    singles = [FolkRComScorer(8, taus=(t,))(images) for t in folk.taus]
    torch.testing.assert_close(folk(images), torch.stack(singles).mean(dim=0))
    assert all(torch.allclose(s.mean(dim=1), torch.ones(2)) for s in singles)


@pytest.mark.parametrize("grid", [8, 7])
def test_stratified_random_keeps_one_patch_per_block_first(grid: int) -> None:
    images = torch.randn(5, 3, grid * 4, grid * 4)
    scores = StratifiedRandomScorer(4)(images)
    rows, cols = torch.arange(grid).repeat_interleave(grid), torch.arange(grid).repeat(grid)
    block = (rows // 2) * grid + cols // 2
    blocks = block.unique().numel()
    for row in keep_top(scores, blocks / grid**2):  # as many patches as blocks
        assert block[row].unique().numel() == blocks  # one in each
    assert not torch.equal(keep_top(scores[:1], 0.25), keep_top(scores[1:2], 0.25))


def _selector(size: int, patch: int) -> PatchClassifier:
    torch.manual_seed(0)
    cfg = ClassifierConfig(img_size=size, patch_size=patch, embed_dim=32, depth=2, num_heads=4)
    return PatchClassifier(cfg, num_classes=3).eval()


@pytest.mark.parametrize(("size", "patch"), [(32, 8), (16, 16)])
@pytest.mark.parametrize("kind", ["random", "flat", "tiny-values"])
def test_supervised_selector_scores(size: int, patch: int, kind: str) -> None:
    images = {
        "random": torch.randn(3, 3, size, size),
        "flat": torch.full((3, 3, size, size), 0.7),
        "tiny-values": torch.randn(3, 3, size, size) * 1e-8,
    }[kind]
    model = _selector(size, patch)
    out = model.cls_attention(images)
    assert out.shape == (3, (size // patch) ** 2)
    assert torch.isfinite(out).all() and (out >= 0).all()
    assert (out.sum(dim=1) <= 1 + 1e-6).all() and (out.sum(dim=1) > 0).all()  # CLS keeps the rest
    assert torch.equal(out, model.cls_attention(images.clone()))


@pytest.mark.parametrize("kind", ["supervised", "mae"])
def test_attention_selectors_are_the_last_blocks_cls_attention(kind: str) -> None:
    """The attention weights timm's own block computes (explicit softmax path), CLS row, mean over heads:
    of the supervised classifier, and of the MAE's encoder (the self-supervised attention baseline)."""
    torch.manual_seed(0)
    model = _selector(32, 8) if kind == "supervised" else ltrp.MAE(ltrp.GEOMETRIES["mae_vit_tiny_patch8"])
    size = model.patch_embed.img_size[0]
    images = torch.randn(2, 3, size, size)
    seen = []
    last = model.blocks[-1].attn
    last.fused_attn = False
    handle = last.attn_drop.register_forward_hook(lambda _m, _i, out: seen.append(out))
    with torch.no_grad():
        model.encode(images)
    handle.remove()
    torch.testing.assert_close(model.cls_attention(images), seen[0].mean(dim=1)[:, 0, 1:])


def test_random_scorer_is_a_function_of_the_image() -> None:
    images = torch.randn(4, 3, 32, 32)
    scorer = RandomScorer(8, seed=0)
    together = scorer(images)
    assert torch.equal(together[2:3], scorer(images[2:3]))  # alone
    assert torch.equal(together[[3, 1]], scorer(images[[3, 1]]))  # another batch, another order
    for a in range(4):
        for b in range(a + 1, 4):
            assert not torch.equal(together[a], together[b])
            assert not torch.equal(keep_top(together[[a]], 0.25), keep_top(together[[b]], 0.25))
    assert not torch.equal(RandomScorer(8, seed=1)(images), together)  # the seed matters too
