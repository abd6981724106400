"""The convergence experiment, on a tiny score table and held-out scenes, in this process."""

import json
from pathlib import Path

import mlflow
import pytest
from support import score_in_process

from jobs.experiments import convergence
from ltrp.data.scenes import SEEN_CLASSES, SHIPPED_MAE, UNSEEN_CLASSES, SceneConfig, write_scenes
from ltrp.pipeline.configs import ScoreConfig

pytestmark = pytest.mark.slow


def test_convergence_measures_every_scenes_count_at_every_measured_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """8 training scenes x 2 views, 4 held-out scenes and their one-round cover: trainings on the first
    4 and 8 images (16 is more than the table has: skipped), measured after each of 2 epochs, logged to
    MLflow."""
    train = write_scenes(tmp_path / "train", "train", 8)
    test = write_scenes(tmp_path / "test", "test", 4, SceneConfig(require=(SEEN_CLASSES, UNSEEN_CLASSES)))
    for name, source, settings in (
        ("scores", train, {"views": 2, "flip": True}),
        ("cover", test, {"cover": 1}),
    ):
        score_in_process(
            ScoreConfig(source=str(source), mae=str(SHIPPED_MAE), output=str(tmp_path / name), **settings)
        )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    out = tmp_path / "out"
    argv = ["--scores", str(tmp_path / "scores"), "--test", str(test), "--oracle", str(tmp_path / "cover")]
    argv += ["--scenes", "4", "8", "16", "--epochs", "2", "--every", "1", "--batch-size", "4"]
    result = convergence.main([*argv, "--output", str(out), "--tracking"])

    assert [run["scenes"] for run in result["runs"]] == [4, 8]
    for run in result["runs"]:
        assert [p["epoch"] for p in run["points"]] == [1, 2] and run["views_per_second"] > 0
        assert run["train_scenes"] <= run["scenes"] and run["train_views"] == 2 * run["train_scenes"]
        for point in run["points"]:
            recall = point["object_recall"]
            assert 0 <= recall["pooled"]["lo"] <= recall["pooled"]["mean"] <= recall["pooled"]["hi"] <= 1
            assert set(recall["kinds"]) == set(result["kinds"]) and -1 <= point["val_kendall_tau"] <= 1
    assert {"random", "variance", "gradient", "folk_rcom", "oracle"} <= set(result["references"])
    assert json.loads((out / "convergence.json").read_text())["runs"][1]["best"] in (1, 2)
    assert (out / "convergence.png").stat().st_size > 0

    stdout = capsys.readouterr().out
    assert "skipping --scenes [16]" in stdout
    assert stdout.count("[convergence] 8 scenes") == 2  # a progress line per measurement
    assert "| 4 (" in stdout and "| oracle |" in stdout

    (run,) = mlflow.search_runs(experiment_names=[convergence.EXPERIMENT], output_format="list")
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "scenes8.object_recall.keep25")
    assert [m.step for m in history] == [1, 2]
    assert "reference.oracle.object_recall.keep25" in run.data.metrics
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert artifacts == {"convergence.json", "convergence.png"}
