"""The set-inference experiment, on a tiny untrained ranker and four held-out scenes, in this process."""

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from jobs.experiments import set_inference
from ltrp.core.ranker import RANKER_GEOMETRIES, Ranker
from ltrp.data.scenes import SEEN_CLASSES, UNSEEN_CLASSES, SceneConfig, write_scenes


def test_recall_and_cost_against_rounds_with_the_one_pass_as_reference(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    test = write_scenes(tmp_path / "test", "test", 4, SceneConfig(require=(SEEN_CLASSES, UNSEEN_CLASSES)))
    torch.manual_seed(0)
    ranker = Ranker(RANKER_GEOMETRIES["ltrp_vit_scenes_tiny_patch4"])  # saved without a set size
    checkpoint = tmp_path / "state.pt"
    torch.save({"model": ranker.state_dict(), "ranker_config": asdict(ranker.cfg)}, checkpoint)
    argv = ["--model", str(checkpoint), "--test", str(test), "--output", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match="no set size recorded"):
        set_inference.main(argv)

    result = set_inference.main([*argv, "--set-size", "19", "--rounds", "2", "1"])
    assert result["set_size"] == 19 and result["scenes"] == 4
    rows = {row["rounds"]: row for row in result["rounds"]}
    assert list(rows) == [0, 1, 2]  # the one pass is always measured: the differences' reference
    assert (
        rows[0]["minus_one_pass"] == {"mean": 0.0, "lo": 0.0, "hi": 0.0} and rows[0]["time_vs_one_pass"] == 1
    )
    for row in rows.values():
        recall = row["recall"]
        assert 0 <= recall["lo"] <= recall["mean"] <= recall["hi"] <= 1 and row["time_vs_one_pass"] > 0
        assert set(row["kinds"]) == set(result["kinds"])
    assert json.loads((tmp_path / "out" / "set_inference.json").read_text())["set_size"] == 19
    assert (tmp_path / "out" / "set_inference.png").stat().st_size > 0
    assert "| 2 | " in capsys.readouterr().out
