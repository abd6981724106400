"""The README's main command end to end at a tiny size: every artifact checked, then a second run that
reuses every step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

import ltrp
from ltrp.data.datasets import FASHION_MNIST_CLASSES
from ltrp.evaluation.measures import from_tags
from ltrp.evaluation.promotion import Policy

REPO = Path(__file__).resolve().parents[2]


def _tiny_config(root: Path) -> dict:
    """jobs/pipeline.yaml, shrunk: the shipped file's own keys, so the test breaks if they drift."""
    spec = yaml.safe_load((REPO / "jobs" / "pipeline.yaml").read_text())
    spec["root"] = str(root)
    spec["train"]["model"] = "models:/ltrp-pipeline-test"
    spec["data"].update(train_images=300, test_images=40)
    spec["pretrain"].update(epochs=1, batch_size=64)
    spec["score"].update(shard_size=150, batch_size=64)
    spec["train"].update(epochs=1, batch_size=64)
    spec["evaluate"].update(max_train=200, max_test=40, classifier_epochs=1, resamples=100)
    return spec


def _run(config: Path, capsys: pytest.CaptureFixture) -> str:
    """`python -m jobs.pipeline --config CONFIG`'s main, in this process, on the session's Ray cluster
    (a new interpreter per run would only add its imports). Returns what it printed."""
    from jobs.pipeline import main

    main(["--config", str(config)])
    return capsys.readouterr().out


@pytest.mark.slow
def test_pipeline_end_to_end_then_reused(
    job_in_process: Path, mlflow_uri: str, capsys: pytest.CaptureFixture
) -> None:
    tmp_path = job_in_process
    root = tmp_path / "runs"
    config = tmp_path / "pipeline.yaml"
    spec = _tiny_config(root)
    config.write_text(yaml.safe_dump(spec))

    out = _run(config, capsys)
    assert "[pipeline] done in" in out and "champion is version 1" in out, out[-2000:]
    state = json.loads((root / "_pipeline.json").read_text())
    assert list(state) == ["data", "pretrain", "score-train", "score-test", "train", "evaluate"]

    # The MAE checkpoint: official layout, loads strictly, scores.
    mae = ltrp.load_mae(state["pretrain"]["results"]["mae"])
    assert mae.cfg.img_size == 32 and mae.cfg.patch_size == 4

    # The score tables: one row per image, 16 of 64 patches scored (mask ratio 0.75).
    train_table = ltrp.read_scores(state["score-train"]["results"]["output"])
    test_table = ltrp.read_scores(state["score-test"]["results"]["output"])
    assert train_table.num_rows == 300 and test_table.num_rows == 40
    assert {len(v) for v in test_table.column("visible").to_pylist()} == {16}
    assert set(train_table.column("label").to_pylist()) == set(FASHION_MNIST_CLASSES)

    # The registered ranker: version 1, candidate and champion, carrying the evaluation's figures.
    client = MlflowClient(mlflow_uri)
    model = client.get_registered_model("ltrp-pipeline-test")
    assert {k: str(v) for k, v in model.aliases.items()} == {"candidate": "1", "champion": "1"}
    tags = client.get_model_version("ltrp-pipeline-test", "1").tags
    assert set(Policy().required_keys) <= set(from_tags(tags))
    assert tags["promotion.decision"] == "promoted"

    # The report and its figures.
    report = Path(state["evaluate"]["results"]["report"])
    text = report.read_text()
    for scorer in ("ltrp", "oracle", "random", "center", "variance", "gradient", "folk_rcom", "supervised"):
        assert f"| {scorer} |" in text
    for png in ("measures_vs_keep_ratio.png", "kept_patches.png"):
        with Image.open(report.parent / png) as img:
            assert img.format == "PNG" and img.width > 400

    # A second run reuses every step: nothing retrained, no new model version.
    again = _run(config, capsys)
    assert again.count("reusing the finished step") == 6, again[-2000:]
    assert "UNCHANGED" in again
    assert len(client.search_model_versions("name='ltrp-pipeline-test'")) == 1
