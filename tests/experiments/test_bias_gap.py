"""The bias-gap experiment: the geometry adjustment on planted effects, then the whole run on four scenes."""

import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs.experiments import bias_gap
from ltrp.core.ranker import RANKER_GEOMETRIES, Ranker
from ltrp.data.scenes import SEEN_CLASSES, UNSEEN_CLASSES, SceneConfig, write_scenes


def _planted(class_effect: float) -> tuple[np.ndarray, bias_gap.Objects]:
    """400 scenes of one seen and one unseen object; seen objects are larger, and recall grows with size
    (plus `class_effect` for the seen ones)."""
    rng = np.random.default_rng(0)
    scenes = 400
    seen = np.tile([True, False], scenes)
    log_pixels = rng.normal(5.0, 0.4, 2 * scenes) + 0.5 * seen  # the seen objects are larger
    geometry = np.stack([log_pixels, rng.uniform(0.3, 1, 2 * scenes), rng.uniform(0, 6, 2 * scenes)], axis=1)
    recall = 0.3 * (log_pixels - 5) + class_effect * seen + rng.normal(0, 0.05, 2 * scenes)
    kinds = np.repeat(rng.choice(["black", "texture"], scenes), 2)
    objects = bias_gap.Objects(
        np.repeat(np.arange(scenes), 2), np.tile([0, 1], scenes), seen, geometry, kinds
    )
    return recall, objects


@pytest.mark.parametrize("class_effect", [0.0, 0.1])
def test_holding_geometry_fixed_removes_the_size_gap_and_keeps_a_class_effect(class_effect: float) -> None:
    recall, objects = _planted(class_effect)
    gaps = bias_gap.selector_gaps(recall, objects, bias_gap.scene_draws(objects, resamples=200, seed=0))
    raw, adjusted = gaps["raw"].summary(), gaps["adjusted"].summary()
    assert raw["lo"] > class_effect + 0.1  # size alone opens a gap of ~0.15
    assert adjusted["lo"] <= class_effect <= adjusted["hi"] and adjusted["hi"] - adjusted["lo"] < 0.05


def test_a_run_on_scenes_reports_every_selector_and_the_geometry(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    test = write_scenes(tmp_path / "test", "test", 6, SceneConfig(require=(SEEN_CLASSES, UNSEEN_CLASSES)))
    torch.manual_seed(0)
    ranker = Ranker(replace(RANKER_GEOMETRIES["ltrp_vit_scenes_tiny_patch4"], set_size=19))
    checkpoint = tmp_path / "state.pt"
    torch.save({"model": ranker.state_dict(), "ranker_config": asdict(ranker.cfg)}, checkpoint)
    out = tmp_path / "out"
    argv = ["--model", str(checkpoint), "--test", str(test), "--output", str(out), "--resamples", "20"]
    result = bias_gap.main([*argv, "--rounds", "2"])

    assert result["scenes"] == 6 and result["objects"] >= 12  # each scene holds a seen and an unseen object
    assert set(result["selectors"]) == {"ltrp", "mae_attention", "center", "variance", "gradient", "random"}
    for row in result["selectors"].values():
        for estimate in row.values():
            assert estimate["lo"] <= estimate["mean"] <= estimate["hi"]
    assert set(result["geometry"]) == set(bias_gap.FEATURES)
    assert set(result["ltrp_minus"]) == {"mae_attention"}  # the oracle and the supervised need their inputs
    ours, other = result["selectors"]["ltrp"]["raw"], result["selectors"]["mae_attention"]["raw"]
    assert result["ltrp_minus"]["mae_attention"]["raw"]["mean"] == pytest.approx(ours["mean"] - other["mean"])
    assert 0 < result["geometry"]["fill of its patches"]["seen"] <= 1
    assert json.loads((out / "bias_gap.json").read_text())["objects"] == result["objects"]
    assert (out / "bias_gap.png").stat().st_size > 0
    assert "| center | " in capsys.readouterr().out
