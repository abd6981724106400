"""The scene evaluation's selectors on real scenes (the job end to end: test_evaluate_job.py)."""

import numpy as np
import pytest
import torch

import ltrp
from ltrp.core.probe import ProbeSettings
from ltrp.core.ranker import keep_top
from ltrp.data.scenes import SHIPPED_MAE, SceneConfig, write_scenes
from ltrp.evaluation.objects import measure
from ltrp.evaluation.scene_eval import SceneEvalSettings, _supervised_selector, load_scene_set


@pytest.mark.slow
def test_the_supervised_selector_learns_to_attend_to_the_seen_class(tmp_path) -> None:
    """A toy: trained on one seen class's labels (Trouser) on black scenes, its CLS attention keeps far
    more of the trousers than random keeps, and more than of the unseen bags beside them."""
    seen, unseen = ("Trouser",), ("Bag",)
    train_cfg = SceneConfig(backgrounds={"black": 1.0}, max_objects=2)
    test_cfg = SceneConfig(backgrounds={"black": 1.0}, max_objects=2, require=(seen, unseen))
    train = load_scene_set(str(write_scenes(tmp_path / "train", "train", 300, train_cfg)), 56, 4)
    test = load_scene_set(str(write_scenes(tmp_path / "test", "test", 40, test_cfg)), 56, 4)
    mae = ltrp.load_mae(str(SHIPPED_MAE))
    settings = SceneEvalSettings(supervised=ProbeSettings(epochs=8, patience=3, lr=5e-4, batch_size=32))
    selector, history = _supervised_selector(mae, train, [train.classes.index("Trouser")], settings)
    assert max(history) > 0.4  # validation AP of "a trouser is in the scene"
    keep = keep_top(selector.cls_attention(test.inputs()), 0.25).numpy()
    supervised = measure(test.objects, keep, seen, unseen)
    g = torch.Generator().manual_seed(0)
    random_keep = torch.rand(len(keep), 196, generator=g).topk(keep.shape[1], dim=1).indices.numpy()
    random = measure(test.objects, random_keep, seen, unseen)
    assert np.nanmean(supervised.seen_recall) > np.nanmean(random.seen_recall) + 0.1
    assert np.nanmean(supervised.bias_gap) > 0
