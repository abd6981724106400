"""Frequency-masked pre-training (FOLK, MFM): the filters, the loss, the teacher, in pure torch."""

from dataclasses import replace

import pytest
import torch

import ltrp
from ltrp.core.folk import (
    Folk,
    FolkConfig,
    apply_filter,
    draw_filters,
    frequency_loss,
    frequency_split,
    kept_frequencies,
    teacher_momentum,
)

TINY = replace(
    ltrp.GEOMETRIES["mae_vit_tiny_patch8"],
    img_size=32,
    embed_dim=32,
    depth=2,
    num_heads=2,
    decoder_embed_dim=32,
)


@pytest.mark.parametrize("tau", [0.005, 0.01, 0.05, 0.5])
def test_com_plus_rcom_is_the_image_and_com_keeps_a_tau_fraction(tau: float) -> None:
    images = torch.randn(2, 3, 32, 32)
    com, rcom = frequency_split(images, tau)
    torch.testing.assert_close(com + rcom, images)
    kept = kept_frequencies(images, "com", tau).flatten(2).sum(dim=2)
    k = max(1, round(tau * 32 * 32))
    assert ((kept == k) | (kept == k + 1)).all()  # k, or k + 1 when the k-th splits a conjugate pair
    assert torch.equal(kept_frequencies(images, "rcom", tau), ~kept_frequencies(images, "com", tau))


@pytest.mark.parametrize("tau", [0.005, 0.05, 0.3])
def test_lowpass_keeps_a_disc_of_about_tau_around_dc_and_highpass_the_rest(tau: float) -> None:
    images = torch.randn(1, 3, 32, 32)
    low = kept_frequencies(images, "lowpass", tau)
    assert low[0, 0, 0, 0] and torch.equal(low[0, 0], low[0, 2])  # DC, the same for every channel
    k = max(1, round(tau * 32 * 32))
    assert k <= low[0, 0].sum() <= 1.3 * k + 4  # the last ring is kept whole
    # Real images: the disc is symmetric, so nothing imaginary is left after filtering.
    assert torch.fft.ifft2(torch.fft.fft2(images) * low).imag.abs().max() < 1e-5
    torch.testing.assert_close(
        apply_filter(images, low) + apply_filter(images, kept_frequencies(images, "highpass", tau)), images
    )


def test_filters_and_taus_are_drawn_per_image() -> None:
    images = torch.randn(32, 3, 32, 32)
    kept = draw_filters(images, ("com", "lowpass"), (0.01, 0.3), torch.Generator().manual_seed(0))
    drawn = []
    for i, image in enumerate(images[:, None]):
        pairs = [(f, t) for f in ("com", "lowpass") for t in (0.01, 0.3)]
        drawn += [p for p in pairs if torch.equal(kept[i : i + 1], kept_frequencies(image, *p))]
    assert len(drawn) == 32 and len(set(drawn)) == 4  # each image one filter and tau; every pair drawn


def test_the_loss_is_zero_for_a_perfect_restoration_and_sees_only_removed_frequencies() -> None:
    torch.manual_seed(0)
    target = torch.randn(3, 3, 32, 32)
    kept = kept_frequencies(target, "com", 0.05)
    assert frequency_loss(target, target, kept) == 0
    off_kept = target + apply_filter(torch.randn_like(target), kept)  # wrong only where the input was kept
    assert frequency_loss(off_kept, target, kept) < 1e-10
    off_removed = target + apply_filter(torch.randn_like(target), ~kept)
    # Parseval: the error of the removed part, as pixel MSE.
    mse = (off_removed - target).square().mean()
    torch.testing.assert_close(frequency_loss(off_removed, target, kept), mse)


@pytest.mark.parametrize("distill_weight", [0.0, 1.0])
def test_only_the_student_learns_and_the_teacher_moves_by_the_ema_rule(distill_weight: float) -> None:
    torch.manual_seed(0)
    model = Folk(ltrp.MAE(TINY), FolkConfig(distill_weight=distill_weight))
    images = torch.randn(4, 3, 32, 32)
    kept = draw_filters(images, ("com", "rcom"), (0.01,), torch.Generator().manual_seed(0))
    model(images, kept).backward()
    assert all(p.grad is not None for p in model.student.parameters() if p.requires_grad)
    if distill_weight == 0:
        assert model.teacher is None and model.distill_head is None
        return
    assert all(p.grad is None for p in model.teacher.parameters())
    assert model.distill_head.weight.grad is not None
    # The teacher starts as the student's encoder, then follows it by t <- m t + (1 - m) s.
    torch.testing.assert_close(model.teacher.state_dict(), model.student.encoder_state())
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(torch.randn_like(p))
    model.update_teacher(0.9)
    student = model.student.encoder_state()
    for name, weight in model.teacher.named_parameters():
        torch.testing.assert_close(weight, 0.9 * before[name] + 0.1 * student[name])


def test_teacher_momentum_rises_from_base_to_one() -> None:
    ramp = [teacher_momentum(s, 100, 0.99) for s in range(0, 101, 10)]
    assert ramp[0] == pytest.approx(0.99) and ramp[-1] == pytest.approx(1.0)
    assert ramp == sorted(ramp)


def test_a_few_steps_lower_the_frequency_loss() -> None:
    torch.manual_seed(0)
    model = Folk(ltrp.MAE(TINY), FolkConfig())
    images = torch.randn(8, 3, 32, 32).cumsum(dim=-1) / 8  # smooth along rows: something to learn
    generator = torch.Generator().manual_seed(0)
    kept = draw_filters(images, ("com", "rcom"), (0.05,), generator)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(30):
        loss = model(images, kept)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.update_teacher(0.99)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
