"""The judge experiment, on 6 held-out scenes and a 2-round oracle, in this process."""

import json
from dataclasses import asdict, replace
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from support import score_in_process

from jobs.experiments import judge
from ltrp.core.mae import GEOMETRIES, MAE
from ltrp.data.checkpoints import save_mae
from ltrp.data.scenes import SHIPPED_MAE, SceneConfig, write_scenes
from ltrp.data.tables import read_scores
from ltrp.evaluation import fidelity
from ltrp.pipeline.configs import ScoreConfig

pytestmark = pytest.mark.slow
#: The shipped MAE's image size and patch grid (every candidate's), at a fraction of its cost to score:
#: an oracle costs a decoder pass per patch per round per scene, whatever the mask ratio.
SMALL = replace(
    GEOMETRIES["mae_vit_scenes_patch4"], embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32,
    decoder_depth=1, decoder_num_heads=2,
)  # fmt: skip


def _checkpoint(folder: Path, state: dict) -> None:
    folder.mkdir(parents=True)
    torch.save(state, folder / "state.pt")


def test_judge_measures_each_candidates_oracle_as_the_scoring_job_builds_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The shipped MAE and a random-weights MAE file on 6 scenes of up to three kinds: each one's recall,
    per kind and pooled, inside its interval; split-half and paired figures present; logged to MLflow;
    and the shipped MAE's oracle is the one a real `jobs.score --cover 2` table gives."""
    scenes = SceneConfig(backgrounds={"black": 1.0, "texture": 1.0, "clutter": 1.0})
    test = write_scenes(tmp_path / "test", "test", 6, scenes)
    torch.manual_seed(0)
    save_mae(MAE(SMALL), str(tmp_path / "random.pth"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    covers = []  # each candidate's cover table, kept as the experiment builds it
    build = judge.cover_table
    monkeypatch.setattr(judge, "cover_table", lambda *args: covers.append(build(*args)) or covers[-1])
    out = tmp_path / "out"
    argv = ["--test", str(test), "--maes", str(SHIPPED_MAE), str(tmp_path / "random.pth")]
    result = judge.main([*argv, "--rounds", "2", "--batch-size", "64", "--output", str(out), "--tracking"])

    kinds = set(pq.read_table(test).column("background").to_pylist())
    assert set(result["kinds"]) == kinds and sum(result["kinds"].values()) == result["test_scenes"] == 6
    shipped = SHIPPED_MAE.stem
    assert [(c["label"], c["run"], c["epoch"], c["final_loss"]) for c in result["candidates"]] == [
        (shipped, None, None, None),
        ("random", None, None, None),
    ]
    for recall in [c["object_recall"] for c in result["candidates"]] + list(result["references"].values()):
        assert set(recall["kinds"]) == kinds
        for e in [recall["pooled"], *recall["kinds"].values()]:
            assert 0 <= e["lo"] <= e["mean"] <= e["hi"] <= 1
    for entry in result["candidates"]:
        half = entry["split_half"]
        assert half["rounds"] == 2 and -1 <= half["tau"]["mean"] <= 1 and "corrected" in half
        assert set(entry["vs_variance"]) == kinds | {"pooled"}
    assert list(result["references"]) == list(judge.REFERENCES)
    assert json.loads((out / "judge.json").read_text())["candidates"][1]["label"] == "random"
    assert (out / "judge.png").stat().st_size > 0

    stdout = capsys.readouterr().out
    assert stdout.count("[judge] random: oracle object recall") == 1  # a progress line per candidate
    assert "| random | - | - |" in stdout and "| variance (reference) |" in stdout

    (run,) = mlflow.search_runs(experiment_names=[judge.EXPERIMENT], output_format="list")
    assert {f"{shipped}.object_recall.keep25", f"{shipped}.split_half_tau"} <= set(run.data.metrics)
    assert "reference.variance.object_recall.keep25" in run.data.metrics

    # The same oracle as the pipeline's: the scoring job's own stages write a real --cover 2 table, of the
    # first 3 scenes (a scene is a function of its index: the same scenes, at half the cost).
    first = write_scenes(tmp_path / "first", "test", 3, scenes)
    cover = ScoreConfig(source=str(first), mae=str(SHIPPED_MAE), output=str(tmp_path / "cover"), cover=2)
    score_in_process(cover)
    table = read_scores(str(tmp_path / "cover"), columns=["image_id", "view", "visible", "scores"])
    ids = pq.read_table(first).column("image_id").to_pylist()
    assert ids == pq.read_table(test).column("image_id").to_pylist()[:3]
    num_patches = GEOMETRIES["mae_vit_scenes_patch4"].num_patches
    np.testing.assert_array_equal(
        fidelity.oracle(covers[0], num_patches, ids), fidelity.oracle(table, num_patches, ids)
    )

    # A pre-training run's curve in the figure and the table (its points are the random MAE's, relabelled).
    curve = [
        result["candidates"][1] | {"label": "run-a", "run": "pt/run-a", "epoch": epoch, "final_loss": loss}
        for epoch, loss in ((1, 0.5), (2, 0.25))
    ]
    report = result | {"candidates": [*result["candidates"], *curve]}
    shown = [(c["label"], c["epoch"]) for c in judge.bar_candidates(report["candidates"])]
    assert shown == [(shipped, None), ("random", None), ("run-a", 1), ("run-a", 2)]  # best (a tie), last
    judge.plot(report, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 0 and "| run-a | 2 | 0.2500 |" in judge.tables(report)


def test_a_pretraining_run_folder_gives_a_candidate_per_checkpoint_labelled_by_its_epochs(
    tmp_path: Path,
) -> None:
    """A run folder as Ray Train leaves it, by hand: checkpoint_*/state.pt with the state that
    `load_pretrained` reads; each is a candidate with its epochs trained and last loss. Folders that are
    no pre-training run, a ranker's checkpoint and labels that do not name each entry once are refused."""
    run = tmp_path / "pt" / "run-a"
    torch.manual_seed(1)
    mae = MAE(SMALL)
    for epoch, history in ((0, [0.5]), (1, [0.5, 0.25])):
        state = {"model": mae.state_dict(), "mae_config": asdict(mae.cfg), "epoch": epoch, "history": history}
        _checkpoint(run / f"checkpoint_00000{epoch}", state)
    (run / "other").mkdir()  # not a checkpoint: ignored

    candidates = judge.list_candidates((str(run), str(SHIPPED_MAE)), ("a", "shipped"))
    assert [(c.label, c.uri, c.run) for c in candidates] == [
        ("a", str(run / "checkpoint_000000"), str(run)),
        ("a", str(run / "checkpoint_000001"), str(run)),
        ("shipped", str(SHIPPED_MAE), None),
    ]
    loaded = [judge.load_candidate(c) for c in candidates[:2]]
    assert [(epochs, loss) for _, epochs, loss in loaded] == [(1, 0.5), (2, 0.25)]
    assert loaded[1][0].cfg == SMALL and torch.equal(loaded[1][0].pos_embed, mae.pos_embed)
    assert [c.label for c in judge.list_candidates((str(run), str(tmp_path / "random.pth")), ())] == [
        "run-a",
        "run-a",
        "random",
    ]

    ranker = tmp_path / "ranker"
    _checkpoint(
        ranker / "checkpoint_000000", {"model": {}, "ranker_config": {}, "epoch": 0, "history": [1.0]}
    )
    with pytest.raises(SystemExit, match="no MAE pre-training checkpoint"):
        judge.load_candidate(judge.list_candidates((str(ranker),), ())[0])
    with pytest.raises(SystemExit, match="not a pre-training run"):
        judge.list_candidates((str(tmp_path / "pt"),), ())
    with pytest.raises(SystemExit, match="2 --maes entries"):
        judge.list_candidates((str(run), str(SHIPPED_MAE)), ("a",))
    with pytest.raises(SystemExit, match="repeat"):
        judge.list_candidates((str(run), str(tmp_path / "elsewhere" / "run-a")), ())
