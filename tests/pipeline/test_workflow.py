"""The README's main command end to end at a tiny size, on scenes with the shipped MAE: every artifact
checked, then a second run that reuses every step. (Plain Fashion-MNIST with pre-training is the
launchers' smoke test of the same pipeline.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

import ltrp
from ltrp.data.scenes import SEEN_CLASSES, SHIPPED_MAE, UNSEEN_CLASSES
from ltrp.evaluation import scene_report
from ltrp.evaluation.promotion import Policy
from ltrp.pipeline.registry import evaluation_of

REPO = Path(__file__).resolve().parents[2]


def _tiny_config(root: Path) -> dict:
    """jobs/pipeline.yaml, shrunk: the shipped file's own keys, so the test breaks if they drift."""
    spec = yaml.safe_load((REPO / "jobs" / "pipeline.yaml").read_text())
    spec["root"] = str(root)
    spec["train"]["register"] = "models:/ltrp-pipeline-test"
    spec["data"].update(train_images=60, test_images=12)
    spec["score"].update(views=2, shard_size=40)
    spec["train"].update(epochs=1)
    spec["ranker_seeds"] = 2  # the seed spread's path, at its smallest
    spec["evaluate"].update(max_train=40, probe_seeds=1, probe_epochs=1, supervised_epochs=1, resamples=50)
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
    config.write_text(yaml.safe_dump(_tiny_config(root)))

    out = _run(config, capsys)
    assert "[pipeline] done in" in out and "object recall" in out, out[-2000:]
    state = json.loads((root / "_pipeline.json").read_text())
    # The shipped MAE: no pre-training; two rankers of the same recipe (seeds 0 and 1).
    assert list(state) == ["data", "score-train", "score-test", "train", "train-seed1", "evaluate"]

    # The score tables: K = 2 views of each training scene; the oracle covers every test position.
    train_table = ltrp.read_scores(state["score-train"]["results"]["output"])
    test_table = ltrp.read_scores(state["score-test"]["results"]["output"])
    assert train_table.num_rows == 120 and set(train_table.column("view").to_pylist()) == {0, 1}
    assert {len(v) for v in test_table.column("visible").to_pylist()} == {19}  # 196 patches, 0.9 masked
    rounds = yaml.safe_load(config.read_text())["score_test"]["cover"]
    assert test_table.num_rows == 12 * 11 * rounds  # each round: 11 disjoint sets of 19 cover 196 patches
    meta = ltrp.read_job_metadata(state["score-test"]["results"]["output"])
    assert meta["mae_sha256"] == ltrp.load_mae(str(SHIPPED_MAE)).checkpoint.sha256

    # The registered ranker: version 1 @candidate, with the evaluation's figures and the floor's.
    client = MlflowClient(mlflow_uri)
    model = client.get_registered_model("ltrp-pipeline-test")
    assert model.aliases["candidate"] in ("1", 1)
    carried = evaluation_of(client.get_model_version("ltrp-pipeline-test", "1"), client).estimates
    policy = Policy().resolved(carried)
    assert policy.primary_key == "object_recall.keep25" and set(policy.required_keys) <= set(carried)
    floor = carried["vs_random.object_recall.keep25"]
    # Champion only above the floor: the ranker's recall beats random's, paired interval above 0.
    assert (model.aliases.get("champion") in ("1", 1)) is (floor.lo > 0)

    # The report and its figures.
    report = Path(state["evaluate"]["results"]["report"])
    text = report.read_text()
    assert text.startswith("# Evaluation of models:/ltrp-pipeline-test/1") and "## Verdict" in text
    for selector in (
        "ltrp",
        "oracle",
        "random",
        "stratified_random",
        "variance",
        "mae_attention",
        "supervised",
        "ltrp_seed1",
    ):
        assert f"| {selector} |" in text
    assert all(c in text for c in (*SEEN_CLASSES, *UNSEEN_CLASSES))
    for png in (scene_report.CURVES, scene_report.CLASSES, scene_report.KEPT):
        with Image.open(report.parent / png) as img:
            assert img.format == "PNG" and img.width > 400

    # A second run reuses every step: nothing retrained, no new model version.
    again = _run(config, capsys)
    assert again.count("reusing the finished step") == 6, again[-2000:]
    assert len(client.search_model_versions("name='ltrp-pipeline-test'")) == 2
