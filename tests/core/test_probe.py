"""The multi-label probe: average precision, and fine-tuning from an MAE's encoder."""

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

import ltrp
from ltrp.core.probe import Probe, ProbeSettings, average_precision, fit_probe, mean_average_precision


def test_average_precision_by_hand_and_as_scikit_learn_computes_it() -> None:
    assert average_precision(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0])) == pytest.approx(
        (1 / 1 + 2 / 3) / 2
    )
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores, positives = rng.random(30), rng.random(30) < 0.3
        if positives.any():
            assert average_precision(scores, positives) == pytest.approx(
                average_precision_score(positives, scores)
            )
    assert np.isnan(average_precision(np.array([0.1, 0.2]), np.array([0, 0])))
    targets = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0]])
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.5], [0.1, 0.7, 0.5]])
    # class 0: positives at ranks 1 and 3 -> (1 + 2/3) / 2; class 1: ranks 1, 2 -> 1; class 2: no positive
    assert mean_average_precision(scores, targets) == pytest.approx(((1 + 2 / 3) / 2 + 1) / 2)


def test_the_probe_starts_as_the_mae_encoder() -> None:
    torch.manual_seed(0)
    mae = ltrp.MAE(ltrp.GEOMETRIES["mae_vit_tiny_patch8"]).eval()
    probe = Probe(mae, num_classes=3).eval()
    images = torch.randn(2, 3, 64, 64)
    visible = ltrp.visible_sets(["a", "b"], grid=8, mask_ratio=0.5)
    with torch.no_grad():
        torch.testing.assert_close(probe.encode(images, visible), mae.encode(images, visible))
    assert probe(images, visible).shape == (2, 3)


def test_a_probe_learns_which_colour_a_patch_shows_and_stops_at_its_best() -> None:
    """Labels = which of 3 colours fill the image's kept patches: learnable from the kept tokens alone."""
    torch.manual_seed(0)
    mae = ltrp.MAE(ltrp.GEOMETRIES["mae_vit_tiny_patch8"]).eval()
    targets = (torch.rand(96, 3) < 0.5).float()
    images = (targets[:, :, None, None] * 2 - 1).expand(-1, -1, 64, 64).contiguous()
    keep = ltrp.visible_sets(range(96), grid=8, mask_ratio=0.75)
    settings = ProbeSettings(epochs=6, patience=2, batch_size=16, lr=2e-3)
    val = (images[64:], targets[64:], keep[64:])
    probe, history = fit_probe(mae, images[:64], targets[:64], keep[:64], settings, seed=0, val=val)
    assert history[-1] > 0.9 or max(history) > 0.9
    scores = torch.cat([probe(images[64:], keep[64:]).sigmoid()]).detach()
    assert mean_average_precision(scores, targets[64:]) == pytest.approx(max(history))
