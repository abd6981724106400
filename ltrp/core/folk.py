"""Frequency-masked pre-training: FOLK (Karimi Monsefi et al., ICLR 2025) and its predecessor MFM (Xie
et al., 2022), as we read them (FOLK's code is unreleased; docs/method.md lists every choice we made).

The student, an MAE, sees every patch of a filtered image: a filter keeps part of each channel's 2-D
Fourier spectrum and drops the rest. Its decoder (the "light head") restores the image, and the loss
counts only the frequencies the filter removed. Filters, drawn per image with a fraction tau:

    com       FOLK: the tau fraction of coefficients of largest magnitude (image-adaptive compression)
    rcom      FOLK: everything com does not keep, what that compression throws away
    lowpass   MFM: the tau fraction of lowest frequencies (a disc around DC, the same for every image)
    highpass  MFM: everything lowpass does not keep

With `distill_weight > 0` (FOLK), a teacher, an exponential moving average of the student's encoder,
encodes the unfiltered image, and a linear head on the student's tokens regresses the teacher's
layer-normalised tokens (as data2vec does): the encoder also learns what natural images look like.

Shapes: B images, C channels, S = img_size, L patches, D = width.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ltrp.core.mae import MAE
from ltrp.core.options import FrequencyFilter as Filter
from ltrp.core.vit import ViTEncoder


# -- filters -------------------------------------------------------------------------------------------
def _strongest(spectrum: torch.Tensor, tau: float) -> torch.Tensor:
    """(B, C, H, W) complex -> bool mask of the k = round(tau * H*W) coefficients of largest magnitude
    per channel (at least one), closed under conjugation so that the filtered image is real (k or k + 1:
    a real image's spectrum comes in conjugate pairs of equal magnitude, and the k-th may split one)."""
    flat = spectrum.flatten(2)
    k = max(1, round(tau * flat.shape[-1]))
    keep = torch.zeros_like(flat, dtype=torch.bool).scatter_(2, flat.abs().topk(k, dim=2).indices, True)
    keep = keep.view_as(spectrum)
    # The conjugate of frequency (u, v) sits at (-u mod H, -v mod W): a flip, then a roll by one.
    return keep | keep.flip(dims=(-2, -1)).roll(shifts=(1, 1), dims=(-2, -1))


def _lowest(height: int, width: int, tau: float, device: torch.device) -> torch.Tensor:
    """(H, W) bool: the disc of frequencies |(u, v)| <= r around DC, r the smallest radius that holds
    k = round(tau * H*W) coefficients (at least one). A disc is symmetric, so the filtered image is real."""
    u = torch.fft.fftfreq(height, d=1 / height, device=device)
    v = torch.fft.fftfreq(width, d=1 / width, device=device)
    radius = (u[:, None] ** 2 + v[None, :] ** 2).sqrt()
    k = max(1, round(tau * height * width))
    return radius <= radius.flatten().kthvalue(k).values


def kept_frequencies(images: torch.Tensor, kind: Filter, tau: float) -> torch.Tensor:
    """The coefficients filter `kind` keeps. images: (B, C, H, W) -> (B, C, H, W) bool, per channel."""
    if kind in ("com", "rcom"):
        keep = _strongest(torch.fft.fft2(images.float()), tau)
    else:
        keep = _lowest(*images.shape[-2:], tau, images.device).expand(images.shape)
    return keep if kind in ("com", "lowpass") else ~keep


def apply_filter(images: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """images: (B, C, H, W), kept: (B, C, H, W) bool -> the images of the kept frequencies only, float32."""
    return torch.fft.ifft2(torch.fft.fft2(images.float()) * kept).real


def frequency_split(images: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """FOLK's Com and RCom of each image: images (B, C, H, W) -> (com, rcom), both float32, com + rcom =
    images (RCom is what the compression throws away)."""
    com = apply_filter(images, kept_frequencies(images, "com", tau))
    return com, images.float() - com


def draw_filters(
    images: torch.Tensor, filters: Sequence[Filter], taus: Sequence[float], generator: torch.Generator
) -> torch.Tensor:
    """A filter and a tau drawn uniformly for each image: images (B, C, H, W) -> kept (B, C, H, W) bool."""
    b = len(images)
    kinds = torch.randint(len(filters), (b,), generator=generator).tolist()
    fractions = torch.randint(len(taus), (b,), generator=generator).tolist()
    kept = torch.empty(images.shape, dtype=torch.bool, device=images.device)
    for f, t in {*zip(kinds, fractions, strict=True)}:  # one pass per pair drawn, over its images
        rows = [i for i in range(b) if (kinds[i], fractions[i]) == (f, t)]
        kept[rows] = kept_frequencies(images[rows], filters[f], taus[t])
    return kept


def frequency_loss(pred: torch.Tensor, target: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """MFM's loss, unweighted: the squared spectral error on the frequencies the filter removed.

    By Parseval this is the pixel MSE of the removed part of the error: normalised per pixel, not per
    removed coefficient, so that an RCom image (a few, strong coefficients removed) and a Com image
    (nearly all, weak ones removed) weigh by how much of the image they hid.

    Args:
        pred: (B, C, H, W) the restored images.
        target: (B, C, H, W) the unfiltered images.
        kept: (B, C, H, W) bool, what the filter kept; the loss ignores those frequencies.

    Returns:
        A scalar, the mean over images (0 for a perfect restoration or an empty batch).
    """
    error = torch.fft.fft2(pred.float() - target.float())
    pixels = math.prod(target.shape[-2:])
    removed = (error.abs().square() * ~kept).sum(dim=(1, 2, 3)) / (target[0].numel() * pixels)
    return removed.sum() / max(1, len(removed))


def teacher_momentum(step: int, total: int, base: float) -> float:
    """The teacher's EMA momentum at `step` of `total`: from `base` up to 1 along a half cosine (BYOL)."""
    return 1 - (1 - base) * (1 + math.cos(math.pi * min(step, total) / max(1, total))) / 2


# -- the model -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FolkConfig:
    """What a frequency-masked pre-training draws and learns (FOLK's defaults)."""

    filters: tuple[Filter, ...] = ("com", "rcom")  # drawn per image; lowpass/highpass: MFM's fixed disc
    taus: tuple[float, ...] = (0.005, 0.01, 0.05)  # fraction com/lowpass keep (rcom/highpass: the rest)
    distill_weight: float = 1.0  # weight of the distillation loss; 0: no teacher (MFM)
    momentum: float = 0.996  # the teacher's EMA momentum at the start; cosine to 1 at the end


class Folk(nn.Module):
    """An MAE trained to restore filtered images, with an EMA teacher of its encoder when distilling.

    Attributes:
        student: the MAE; its encoder sees every patch of the filtered image, its decoder restores it.
        teacher: a ViT encoder of the student's shape, moved only by `update_teacher` (None: MFM).
        distill_head: (D -> D) maps the student's tokens to the teacher's (None: MFM).
    """

    def __init__(self, mae: MAE, cfg: FolkConfig) -> None:
        super().__init__()
        self.student, self.cfg = mae, cfg
        self.teacher: ViTEncoder | None = None
        self.distill_head: nn.Linear | None = None
        if cfg.distill_weight > 0:
            self.teacher = ViTEncoder(**mae.cfg.encoder)
            self.teacher.load_state_dict(mae.encoder_state())  # strict: the student's encoder, exactly
            self.teacher.requires_grad_(False)
            self.distill_head = nn.Linear(mae.cfg.embed_dim, mae.cfg.embed_dim)

    def restore(self, imgs: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """imgs: (B, C, S, S), kept: (B, C, S, S) bool -> (filtered (B, C, S, S), the student's tokens
        (B, 1 + L, D), restored images (B, C, S, S))."""
        mae = self.student
        filtered = apply_filter(imgs, kept).to(imgs.dtype)
        latent = mae.encode(filtered)  # every patch
        every = torch.arange(mae.cfg.num_patches, device=imgs.device).expand(len(imgs), -1)
        pred = mae.predict(mae.decode_hidden(mae.decoder_input(latent, every)))[:, 1:]
        return filtered, latent, mae.unpatchify(pred)

    def forward(self, imgs: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """The training loss of a batch. imgs: (B, C, S, S) model input, kept: (B, C, S, S) bool -> scalar:
        the frequency loss, plus `distill_weight` times the distillation MSE when there is a teacher."""
        _, latent, restored = self.restore(imgs, kept)
        loss = frequency_loss(restored, imgs, kept)
        if self.teacher is None:
            return loss
        with torch.no_grad():
            target = self.teacher.encode(imgs).float()
            target = F.layer_norm(target, target.shape[-1:])  # data2vec's targets: scale-free tokens
        return loss + self.cfg.distill_weight * F.mse_loss(self.distill_head(latent).float(), target)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student encoder, weight by weight."""
        student = dict(self.student.named_parameters())
        for name, weight in self.teacher.named_parameters():
            weight.lerp_(student[name].detach(), 1 - momentum)
