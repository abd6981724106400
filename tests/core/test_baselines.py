import pytest
import torch

from ltrp.core.baselines import (
    CenterScorer,
    FolkRComScorer,
    GradientEnergyScorer,
    RandomScorer,
    RankerScorer,
    VarianceScorer,
    frequency_split,
)
from ltrp.core.classifier import ClassifierConfig, PatchClassifier
from ltrp.core.ranker import RANKER_GEOMETRIES, Ranker, keep_top


def _scorers(patch: int) -> list:
    torch.manual_seed(0)
    return [
        RandomScorer(patch),
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


@pytest.mark.parametrize("tau", [0.005, 0.01, 0.05, 0.5])
def test_com_plus_rcom_is_the_image_and_com_keeps_a_tau_fraction(tau: float) -> None:
    images = torch.randn(2, 3, 32, 32)
    com, rcom = frequency_split(images, tau)
    torch.testing.assert_close(com + rcom, images)
    kept = (torch.fft.fft2(com).abs() > 1e-4).flatten(2).sum(dim=2)
    k = max(1, round(tau * 32 * 32))
    assert ((kept == k) | (kept == k + 1)).all()  # k, or k + 1 when the k-th splits a conjugate pair


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


def test_supervised_selector_is_the_last_blocks_cls_attention() -> None:
    """The attention weights timm's own block computes (explicit softmax path), CLS row, mean over heads."""
    model = _selector(32, 8)
    images = torch.randn(2, 3, 32, 32)
    seen = []
    last = model.blocks[-1].attn
    last.fused_attn = False
    handle = last.attn_drop.register_forward_hook(lambda _m, _i, out: seen.append(out))
    with torch.no_grad():
        model(images)
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
