"""The scene evaluation's selectors on real scenes, and its per-kind, oracle and seed figures on
hand-made per-scene values (the job end to end: test_evaluate_job.py)."""

import numpy as np
import pytest
import torch

import ltrp
from ltrp.core.probe import ProbeSettings
from ltrp.core.ranker import keep_top
from ltrp.data.scenes import FIRST_MAE, SceneConfig, write_scenes
from ltrp.evaluation.objects import measure
from ltrp.evaluation.scene_eval import (
    POOLED,
    SceneEvalSettings,
    gain_share,
    kind_order,
    load_scene_set,
    oracle_gain_share,
    paired_by_kind,
    seed_average,
    seed_spread,
    split_half_reliability,
    supervised_selector,
)


@pytest.mark.slow
def test_the_supervised_selector_learns_to_attend_to_the_seen_class(tmp_path) -> None:
    """A toy: trained on one seen class's labels (Trouser) on black scenes, its CLS attention keeps far
    more of the trousers than random keeps, and more than of the unseen bags beside them."""
    seen, unseen = ("Trouser",), ("Bag",)
    train_cfg = SceneConfig(backgrounds={"black": 1.0}, max_objects=2)
    test_cfg = SceneConfig(backgrounds={"black": 1.0}, max_objects=2, require=(seen, unseen))
    train = load_scene_set(str(write_scenes(tmp_path / "train", "train", 300, train_cfg)), 56, 4)
    test = load_scene_set(str(write_scenes(tmp_path / "test", "test", 40, test_cfg)), 56, 4)
    # The first shipped MAE (1,250 pre-training steps): the shipped judge's encoder (375 steps) fits the
    # labels too (AP 0.4 in 16 epochs) but its CLS attention then rests on the background; this toy tests
    # the selector's mechanism, not how far an encoder was trained.
    mae = ltrp.load_mae(str(FIRST_MAE))
    settings = SceneEvalSettings(supervised=ProbeSettings(epochs=8, patience=3, lr=5e-4, batch_size=32))
    selector, history = supervised_selector(mae, train, [train.classes.index("Trouser")], settings)
    assert max(history) > 0.4  # validation AP of "a trouser is in the scene"
    keep = keep_top(selector.cls_attention(test.inputs()), 0.25).numpy()
    supervised = measure(test.objects, keep, seen, unseen)
    g = torch.Generator().manual_seed(0)
    random_keep = torch.rand(len(keep), 196, generator=g).topk(keep.shape[1], dim=1).indices.numpy()
    random = measure(test.objects, random_keep, seen, unseen)
    assert np.nanmean(supervised.seen_recall) > np.nanmean(random.seen_recall) + 0.1
    assert np.nanmean(supervised.bias_gap) > 0


def test_kinds_where_edges_mislead_come_first_black_then_unknown_kinds() -> None:
    kinds = ["black", "texture", "zebra", "shapes", "faint", "alpha", "clutter", "photo", "black"]
    assert kind_order(kinds) == ["shapes", "clutter", "faint", "photo", "texture", "black", "alpha", "zebra"]
    assert kind_order(["photo", "?"]) == ["photo", "?"]  # a manifest without a background column


def test_paired_by_kind_is_the_mean_difference_over_each_kinds_scenes() -> None:
    ours = np.array([0.5, 0.6, 0.7, 0.8, 0.9])
    variance = np.array([0.4, 0.6, 0.5, 0.9, np.nan])  # the last scene is not measured: left out
    kinds = np.array(["black", "clutter", "black", "clutter", "clutter"])
    got = paired_by_kind(ours, {"variance": variance}, kinds, resamples=200, seed=0)
    assert list(got) == ["clutter", "black", POOLED]
    assert got["black"]["variance"].mean == pytest.approx((0.1 + 0.2) / 2)
    assert got["clutter"]["variance"].mean == pytest.approx((0.0 - 0.1) / 2)
    assert got[POOLED]["variance"].mean == pytest.approx((0.1 + 0.0 + 0.2 - 0.1) / 4)
    for kind in got.values():
        assert kind["variance"].lo <= kind["variance"].mean <= kind["variance"].hi


def test_the_gain_share_is_a_ratio_of_means() -> None:
    ours, random, oracle = np.array([0.5, 0.7]), np.array([0.25, 0.25]), np.array([0.75, 0.85])
    share = gain_share(ours, random, oracle, resamples=200, seed=0)
    assert share.mean == pytest.approx((0.6 - 0.25) / (0.8 - 0.25))
    assert share.lo <= share.mean <= share.hi
    # 90% of the oracle's gain on every scene: every resample gives 90%.
    random = np.linspace(0.1, 0.3, 12)
    oracle = random + np.linspace(0.2, 0.5, 12)
    kinds = np.array(["black", "photo"] * 6)
    shares = oracle_gain_share(random + 0.9 * (oracle - random), random, oracle, kinds, 200, 0)
    assert list(shares) == ["photo", "black", POOLED]
    for e in shares.values():
        assert e.mean == pytest.approx(0.9) and e.lo == pytest.approx(0.9) and e.hi == pytest.approx(0.9)


def test_seed_spread_over_seeds_and_the_per_scene_seed_mean() -> None:
    recalls = {
        "ltrp": np.array([0.4, 0.6]),
        "ltrp_seed1": np.array([0.5, 0.7]),
        "ltrp_seed2": np.array([0.3, 0.5]),
    }
    np.testing.assert_allclose(seed_average(list(recalls.values())), [0.4, 0.6])
    spread = seed_spread(recalls, resamples=200, seed=0)
    assert spread.per_seed == pytest.approx({"ltrp": 0.5, "ltrp_seed1": 0.6, "ltrp_seed2": 0.4})
    assert (spread.low, spread.high) == pytest.approx((0.4, 0.6))
    assert spread.std == pytest.approx(0.1)  # sqrt((0 + 0.01 + 0.01) / 2)
    assert spread.mean.mean == pytest.approx(0.5)


def test_split_half_reliability_of_identical_and_reversed_halves() -> None:
    first = np.array([[0.0, 1.0, 2.0, 3.0], [3.0, 1.0, 2.0, 0.0]])
    same = split_half_reliability(first, first.copy(), rounds=4, resamples=50, seed=0)
    assert same.tau.mean == pytest.approx(1.0) and same.corrected == pytest.approx(1.0) and same.rounds == 4
    reversed_ = split_half_reliability(first, -first, rounds=2, resamples=50, seed=0)
    assert reversed_.tau.mean == pytest.approx(-1.0) and np.isnan(reversed_.corrected)
