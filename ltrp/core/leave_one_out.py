"""Leave-one-out pseudo-scores ("semantic density") of visible patches, from a frozen MAE.

Score of visible patch v: mean over the originally masked positions and all p*p*C values of
|A - R_v| (or its square), where A is the MAE's reconstruction from all n visible patches and R_v the
reconstruction without v (docs/method.md, section 2).

All n leave-one-out variants of a batch run as one batch of decoder sequences, with fixed shapes and
no host synchronisation. Decoder mode (the paper's) *drops* v's token with a gather, which gives
exactly what the authors' -inf row/column mask gives for every other position but lets attention use
fused kernels. Encoder mode hides v as MAE hides any patch: the encoder sees the other n - 1, and v's
decoder slot holds the mask token (plus its position), so R_v is the plain MAE forward without v.
"""

from __future__ import annotations

import contextlib

import torch

from ltrp.core.mae import MAE
from ltrp.core.options import Metric, Mode, Precision
from ltrp.core.vit import gather_tokens

#: A precision option -> the autocast dtype of `loo_scores` (None: plain fp32).
AUTOCAST_DTYPES: dict[Precision, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def masked_positions(visible: torch.Tensor, num_patches: int) -> torch.Tensor:
    """visible: (B, n) -> the other L - n patch indices, ascending: (B, L - n)."""
    is_visible = torch.zeros(visible.shape[0], num_patches, dtype=torch.uint8, device=visible.device)
    is_visible.scatter_(1, visible, 1)
    # A stable sort puts the zeros (masked) first, each group in index order: fixed shape, no sync.
    return torch.argsort(is_visible, dim=1, stable=True)[:, : num_patches - visible.shape[1]]


def drop_one(visible: torch.Tensor) -> torch.Tensor:
    """visible: (B, n) -> (B, n, n - 1): row j is the visible set without its j-th patch."""
    n = visible.shape[1]
    k = torch.arange(n - 1, device=visible.device)
    keep = k + (k >= torch.arange(n, device=visible.device)[:, None])  # (n, n-1): skips column j
    return visible[:, keep]


def pixel_distance(a: torch.Tensor, b: torch.Tensor, metric: Metric) -> torch.Tensor:
    """a, b: (..., T, P) -> mean absolute (l1) or squared (l2) difference over the last two dims: (...)."""
    diff = a.float() - b.float()  # in fp32 even under autocast: scores are small differences
    diff = diff.abs() if metric == "l1" else diff.square()
    return diff.mean(dim=(-2, -1))


def check_visible(visible: torch.Tensor, num_patches: int) -> None:
    """Refuses visible sets that are not (B, n) sorted, distinct, in-range patch indices (one sync)."""
    if visible.ndim != 2 or visible.dtype != torch.long:
        raise ValueError(f"visible must be a (B, n) int64 tensor, got {tuple(visible.shape)} {visible.dtype}")
    if not 1 <= visible.shape[1] < num_patches:
        raise ValueError(f"visible has {visible.shape[1]} patches per image; need 1..{num_patches - 1}")
    ok = (visible[:, 0] >= 0).all() & (visible[:, -1] < num_patches).all()
    ok &= (visible.diff(dim=1) > 0).all()
    if not bool(ok):
        raise ValueError(f"visible rows must be strictly increasing patch indices in [0, {num_patches})")


def _precision(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@torch.inference_mode()
def loo_scores(
    mae: MAE,
    images: torch.Tensor,
    visible: torch.Tensor,
    *,
    mode: Mode = "decoder",
    metric: Metric = "l1",
    max_tokens: int | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Leave-one-out importance of each visible patch.

    Args:
        mae: a frozen MAE with a decoder (eval mode is set by the caller; dropout would add noise).
        images: (B, C, S, S) normalised as the MAE was trained (ImageNet mean/std for the official ones).
        visible: (B, n) sorted patch indices the MAE sees, e.g. from `visible_sets`.
        mode: "decoder" (the authors' semantics: v is cut out of the decoder only; the other latents
            still saw v inside the encoder) or "encoder" (v is masked as MAE masks any patch: the
            encoder sees the other n - 1, and v's decoder slot holds the mask token; R_v is then
            `mae(images, visible without v)`). Either way only the L - n originally masked
            positions are compared, not v's.
        metric: "l1" (mean |A - R_v|, the default) or "l2" (mean squared difference).
        max_tokens: decoder tokens per chunk of leave-one-out sequences; bounds memory. None: 4096 on
            a CPU (cache-sized chunks measured fastest there: 0.63 vs 0.51 img/s at 65536, MAE-B),
            131072 on a GPU (large enough to fill it, about 1 GB of activations for MAE-B in bf16).
        autocast_dtype: None for the model's own precision, or torch.bfloat16 / torch.float16 to run
            under autocast (the distances are always taken in fp32).

    Returns:
        scores: (B, n) float32, aligned with `visible`; larger = more important.
    """
    if mode not in ("decoder", "encoder"):
        raise ValueError(f"mode must be 'decoder' or 'encoder', got {mode!r}")
    if metric not in ("l1", "l2"):
        raise ValueError(f"metric must be 'l1' or 'l2', got {metric!r}")
    num_patches = mae.cfg.num_patches
    check_visible(visible, num_patches)
    batch, n = visible.shape
    masked = masked_positions(visible, num_patches)  # (B, L-n)

    with _precision(images.device, autocast_dtype):
        patches = mae.embed_patches(images)  # (B, L, D)
        latent = mae.encode_tokens(gather_tokens(patches, visible))  # (B, 1+n, D)
        tokens = mae.decoder_input(latent, visible)  # (B, 1+L, Dd)
        anchor = mae.predict(gather_tokens(mae.decode_hidden(tokens)[:, 1:], masked))  # (B, L-n, P)

        if max_tokens is None:
            max_tokens = 4096 if images.device.type == "cpu" else 131072
        rows_per_chunk = max(1, max_tokens // num_patches)
        scores = torch.empty(batch * n, dtype=torch.float32, device=images.device)
        for start in range(0, batch * n, rows_per_chunk):
            rows = torch.arange(start, min(start + rows_per_chunk, batch * n), device=images.device)
            img, j = rows // n, rows % n  # variant row r = image b, left-out visible index j
            if mode == "decoder":  # everyone's latents saw v in the encoder; v's token is dropped
                removed = visible[img, j]  # (R,)
                hidden = mae.decode_hidden(_without_position(tokens[img], removed))  # (R, L, Dd)
                # Patch p sits at 1 + p in the full sequence; after dropping v, at 1 + p - [p > v].
                at = 1 + masked[img] - (masked[img] > removed[:, None]).long()  # (R, L-n)
            else:  # re-encoded without v; decoder_input puts the mask token in v's slot
                kept = drop_one(visible)[img, j]  # (R, n-1)
                latent_v = mae.encode_tokens(gather_tokens(patches[img], kept))  # (R, n, D)
                hidden = mae.decode_hidden(mae.decoder_input(latent_v, kept))  # (R, 1+L, Dd)
                at = 1 + masked[img]  # (R, L-n)
            recon = mae.predict(gather_tokens(hidden, at))  # (R, L-n, P)
            scores[rows] = pixel_distance(anchor[img], recon, metric)
    return scores.view(batch, n)


def _without_position(tokens: torch.Tensor, patch: torch.Tensor) -> torch.Tensor:
    """tokens: (R, 1 + L, Dd), patch: (R,) -> (R, L, Dd) without the token of that patch (at 1 + patch)."""
    k = torch.arange(tokens.shape[1] - 1, device=tokens.device)
    index = k + (k >= 1 + patch[:, None]).long()  # (R, L): every position but 1 + patch, in order
    return gather_tokens(tokens, index)
