"""The evaluation job end to end: a registered ranker evaluated through a real MLflow server, its logged
model given the figures as metrics and its version a summary as tags, then promoted; and the refusals
that come before any measure or MLflow run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from support import SMALL_MAE, SMALL_RANKER, fashion_mnist, score_rows, write_folder, write_table

import ltrp
from ltrp.core.ranker import RANKER_GEOMETRIES, Ranker, RankerConfig
from ltrp.evaluation.measures import KEEP_RATIOS
from ltrp.evaluation.promotion import Policy
from ltrp.evaluation.report import CURVES, KEPT, REPORT
from ltrp.pipeline import evaluate_job
from ltrp.pipeline.configs import ConfigError, EvaluateConfig, InputError
from ltrp.pipeline.registry import evaluation_of, logged_model_id, register_ranker

ROOT = Path(__file__).resolve().parents[2]


def ranker_checkpoint(path: Path, cfg: RankerConfig) -> Path:
    torch.save({"model": Ranker(cfg).state_dict(), "ranker_config": asdict(cfg)}, path)
    return path


def test_seed_models_take_the_forms_of_model() -> None:
    given = {
        "model": "models:/r/1",
        "mae": "m.pth",
        "scores": ("s",),
        "train_source": "a",
        "test_source": "b",
    }
    cfg = EvaluateConfig(**given, seed_models=("models:/r/2", "models:/r@seed3", "runs/state.pt"))
    assert cfg.seed_models == ("models:/r/2", "models:/r@seed3", "runs/state.pt")
    for bad in ("models:/r", "models:/r/2/3"):
        with pytest.raises(ConfigError, match=f"--seed-models: expected models:/NAME/VERSION.*{bad!r}"):
            EvaluateConfig(**given, seed_models=("models:/r/2", bad))


def test_job_refuses_a_bad_model_file_and_an_uncovered_table(tmp_path: Path) -> None:
    images, labels = fashion_mnist(16)
    test_dir = write_folder(tmp_path / "test", images[:8], labels[:8])
    other_dir = write_folder(tmp_path / "other", images[8:], labels[8:], first=8)
    torch.manual_seed(0)
    mae = ltrp.MAE(SMALL_MAE).eval()
    ltrp.save_mae(mae, str(tmp_path / "mae.pth"))
    table = write_table(tmp_path / "scores-other", score_rows(other_dir, mae))  # not the test images
    bad = tmp_path / "not-a-ranker.pt"
    bad.write_bytes(b"hello")
    cfg = EvaluateConfig(
        model=str(bad),
        mae=str(tmp_path / "mae.pth"),
        scores=(str(table),),
        train_source=str(test_dir),
        test_source=str(test_dir),
        output=str(tmp_path / "out"),
    )
    with pytest.raises(InputError, match="not a ranker checkpoint") as err:
        evaluate_job.run(cfg)
    assert str(bad) in str(err.value)
    good = ranker_checkpoint(tmp_path / "state.pt", SMALL_RANKER)
    job = table / "_ltrp_job.json"
    job.write_text(json.dumps({"fingerprint": ["mae_sha256"], "mae_sha256": "0" * 64}))  # another MAE's
    with pytest.raises(InputError, match=f"--scores {table} was scored by the MAE with sha256 0000"):
        evaluate_job.run(replace(cfg, model=str(good)))
    job.write_text(json.dumps({"fingerprint": []}))
    other_grid = replace(SMALL_RANKER, img_size=SMALL_RANKER.img_size * 2)
    grid = str(ranker_checkpoint(tmp_path / "grid.pt", other_grid))
    with pytest.raises(InputError, match=r"ranks \d+ patches, --mae .* has \d+"):
        evaluate_job.run(replace(cfg, model=grid))
    with pytest.raises(InputError, match=rf"--seed-models {grid} ranks \d+ patches"):
        evaluate_job.run(replace(cfg, model=str(good), seed_models=(str(good), grid)))
    with pytest.raises(InputError, match="--seed-models: measured on scenes with object masks only"):
        evaluate_job.run(replace(cfg, model=str(good), seed_models=(str(good),)))
    with pytest.raises(ValueError, match="no held-out image has an unflipped central-square row") as err:
        evaluate_job.run(replace(cfg, model=str(good)))
    assert str(table) in str(err.value)
    assert not (tmp_path / "out").exists()


def python_module(module: str, args: list[str], cwd: Path, uri: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env={
            **os.environ,
            "MLFLOW_TRACKING_URI": uri,
            "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        },
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_evaluate_job_logs_metrics_on_the_logged_model_and_promotion_follows(
    mlflow_uri: str, job_in_process: Path, capsys: pytest.CaptureFixture
) -> None:
    tmp_path = job_in_process
    images, labels = fashion_mnist(260)
    test_dir = write_folder(tmp_path / "data" / "test", images[:60], labels[:60])
    train_dir = write_folder(tmp_path / "data" / "train", images[60:], labels[60:], first=60)
    torch.manual_seed(0)
    mae = ltrp.MAE(SMALL_MAE).eval()
    ltrp.save_mae(mae, str(tmp_path / "mae.pth"))
    table = write_table(tmp_path / "scores-test", score_rows(test_dir, mae))

    name = "eval-ranker"
    mlflow.set_tracking_uri(mlflow_uri)
    mlflow.set_experiment("ltrp-train-for-eval-test")
    with mlflow.start_run():
        register_ranker(Ranker(RANKER_GEOMETRIES["ltrp_vit_fmnist_patch4"]), name, tags={"source": "test"})
    client = MlflowClient(mlflow_uri)
    stale = "eval.accuracy.keep05.mean"  # from an earlier evaluation at another keep ratio
    client.set_model_version_tag(name, "1", stale, "0.99")
    out = tmp_path / "eval-out"
    # fmt: off
    args = [
        "--model", f"models:/{name}/1", "--mae", str(tmp_path / "mae.pth"), "--scores", str(table),
        "--train-source", str(train_dir), "--test-source", str(test_dir), "--output", str(out),
        "--max-train", "200", "--max-test", "60", "--classifier-epochs", "1", "--resamples", "200",
        "--classifier-dim", "32", "--classifier-depth", "1",
    ]
    # fmt: on
    from jobs.evaluate import main  # in this process: a new interpreter would only add its imports

    main(args)
    assert "evaluated models:/eval-ranker/1 on 60 held-out images" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted([REPORT, CURVES, KEPT, "estimates.json"])
    estimates = json.loads((out / "estimates.json").read_text())
    assert set(estimates) >= {"ltrp", "oracle", "random", "supervised", "folk_rcom"}

    tags = client.get_model_version(name, "1").tags
    assert stale not in tags and tags["source"] == "test"  # the evaluation replaced only its own record
    run = client.get_run(tags["eval.run_id"])
    assert run.info.experiment_id == client.get_experiment_by_name("ltrp-evaluate").experiment_id
    assert tags["eval.dataset"] == run.data.tags["eval.dataset"]
    for key in ("ltrp.reconstruction_error.keep25", "ltrp.accuracy.keep10", "random.kendall_tau"):
        assert np.isfinite(run.data.metrics[key]), key
    assert run.data.metrics["oracle.kendall_tau"] == pytest.approx(1.0)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artifacts >= {REPORT, CURVES, KEPT, "estimates.json"}
    (held_out,) = [i.dataset for i in run.inputs.dataset_inputs]
    assert (held_out.name, held_out.digest) == ("held-out", tags["eval.dataset"][:36])
    # The figures are the logged model's metrics on that dataset: what versions are compared and
    # searched by in the MLflow UI.
    model_id = logged_model_id(client.get_model_version(name, "1"))
    model = mlflow.get_logged_model(model_id)
    logged = {m.key: m for m in model.metrics}
    key = "reconstruction_error.keep25.mean"
    assert logged[key].value == pytest.approx(
        estimates["ltrp"]["reconstruction_error.keep25"]["mean"], rel=1e-6
    )
    assert logged[key].dataset_name == "held-out" and logged[key].dataset_digest == held_out.digest
    for bound, holds in ((logged[key].value - 1e-6, True), (logged[key].value + 1e-6, False)):
        found = mlflow.search_logged_models(
            experiment_ids=[model.experiment_id],
            filter_string=f"metrics.`{key}` > {bound}",
            output_format="list",
        )
        assert (model_id in {m.model_id for m in found}) is holds, (bound, found)
    # What promotion reads: the metrics, on the dataset the version's summary names.
    evaluated = evaluation_of(client.get_model_version(name, "1"), client)
    assert evaluated.dataset == tags["eval.dataset"]
    carried = evaluated.estimates
    assert set(Policy().resolved(carried).required_keys) <= set(carried)
    assert {"kendall_tau", "spearman", "vs_random.reconstruction_error.keep25"} <= set(carried)
    assert carried["reconstruction_error.keep25"].mean == pytest.approx(
        estimates["ltrp"]["reconstruction_error.keep25"]["mean"], rel=1e-4
    )
    assert len(KEEP_RATIOS) == len([k for k in carried if k.startswith("accuracy.keep")])

    # The floor: an untrained ranker becomes champion only if it beats random on the primary measure.
    floor = carried["vs_random.reconstruction_error.keep25"]
    above = floor.hi < 0
    promote = python_module(
        "jobs.promote", ["--model", f"models:/{name}", "--candidate", "1"], tmp_path, mlflow_uri
    )
    assert promote.returncode == (0 if above else 3), promote.stderr
    assert ("does not beat random" in promote.stdout) is not above, promote.stdout
    (tmp_path / "no-floor.yaml").write_text("beat_random: false\n")
    args = ["--model", f"models:/{name}", "--candidate", "1", "--policy", str(tmp_path / "no-floor.yaml")]
    promote = python_module("jobs.promote", args, tmp_path, mlflow_uri)
    assert promote.returncode == 0, promote.stderr
    assert client.get_registered_model(name).aliases.get("champion") in ("1", 1)
    assert not (tmp_path / "mlruns").exists()  # everything went to the server


def _cover_table(root: Path, manifest: Path, mae: ltrp.MAE, rounds: int) -> Path:
    """A full-coverage score table of a scene manifest, as `python -m jobs.score --cover` writes it."""
    from ltrp.core.masking import cover_sets
    from ltrp.evaluation.scene_eval import load_scene_set

    scenes = load_scene_set(str(manifest), mae.cfg.img_size, mae.cfg.patch_size)
    rows = []
    for image_id, x in zip(scenes.image_ids, scenes.inputs(), strict=True):
        sets = cover_sets(image_id, grid=mae.cfg.grid, mask_ratio=0.9, rounds=rounds)
        with torch.inference_mode():
            scores = ltrp.loo_scores(mae, x.expand(len(sets), -1, -1, -1), sets)
        rows += [
            {"image_id": image_id, "uri": "", "label": None, "view": v, "crop_box": [0, 0, 56, 56],
             "flip": False, "visible": s.tolist(), "scores": sc.tolist()}
            for v, (s, sc) in enumerate(zip(sets, scores, strict=True))
        ]  # fmt: skip
    return write_table(root, rows)


@pytest.mark.slow
def test_scene_evaluation_reports_object_recall_and_the_bias_gap(job_in_process: Path) -> None:
    """A scene manifest with masks as --test-source: the scene evaluation, its report and figures; the
    oracle from a 2-round --cover table, and its split-half reliability; a seed model (the same
    checkpoint again: no spread); a table that does not cover every position is refused up front."""
    tmp_path = job_in_process
    from ltrp.data.scenes import SEEN_CLASSES, UNSEEN_CLASSES, SceneConfig, write_scenes
    from ltrp.evaluation import scene_report
    from ltrp.evaluation.scene_eval import load_scene_set

    train = write_scenes(tmp_path / "train", "train", 40)
    test = write_scenes(tmp_path / "test", "test", 12, SceneConfig(require=(SEEN_CLASSES, UNSEEN_CLASSES)))
    assert evaluate_job.has_masks(str(test)) and not evaluate_job.has_masks(str(tmp_path / "test"))
    torch.manual_seed(0)
    mae = ltrp.MAE(replace(SMALL_MAE, img_size=56)).eval()
    ltrp.save_mae(mae, str(tmp_path / "mae.pth"))
    table = _cover_table(tmp_path / "cover", test, mae, rounds=2)
    ranker = ranker_checkpoint(tmp_path / "state.pt", replace(SMALL_RANKER, img_size=56))
    cfg = EvaluateConfig(
        model=str(ranker), mae=str(tmp_path / "mae.pth"), scores=(str(table),), train_source=str(train),
        test_source=str(test), output=str(tmp_path / "out"), keep_ratios=(0.1, 0.25), probe_seeds=2,
        probe_epochs=1, supervised_epochs=1, resamples=50, seed_models=(str(ranker),),
    )  # fmt: skip
    summary = evaluate_job.run(cfg, progress=lambda _: None)
    result = summary.result
    assert result.test_images == 12 and result.train_images == 40
    assert {"ltrp", "oracle", "random", "stratified_random", "mae_attention", "supervised"} <= set(
        result.selectors
    )
    for name in result.selectors:
        recall = result.estimates[name]["object_recall.keep25"]
        assert 0 <= recall.lo <= recall.mean <= recall.hi <= 1
    assert result.bias_did["random"][0.25].mean == 0  # random against itself
    assert len(result.probe_map["ltrp"]) == 2 and "oracle" not in result.probe_map
    assert result.seed_selectors == ["ltrp_seed1"] and "ltrp_seed1" not in result.probe_map
    assert (
        result.seed_spread.std == 0
        and result.seed_spread.mean == result.estimates["ltrp"]["object_recall.keep25"]
    )
    assert result.split_half.rounds == 2 and -1 <= result.split_half.tau.mean <= 1
    kinds = [k for k in result.kind_paired["ltrp"] if k != "pooled"]
    assert sorted(kinds) == sorted(set(load_scene_set(str(test), 56, 4).backgrounds))
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [scene_report.REPORT, scene_report.CURVES, scene_report.CLASSES, scene_report.KEPT, "estimates.json"]
    )
    text = (out / scene_report.REPORT).read_text()
    assert (
        text.index("## Verdict") < text.index("## Primary results at 25% keep") < text.index("## Secondary")
    )
    for section in ("Against the goal", "per background kind: the ranker minus", "share of the oracle's gain",
                    "split-half reliability", "ltrp, mean of 2 training seeds"):  # fmt: skip
        assert section in text, section
    figures = json.loads((out / "estimates.json").read_text())
    assert figures["ltrp_seed1"]["object_recall.keep10"] == figures["ltrp"]["object_recall.keep10"]
    assert {"paired_by_background", "oracle_gain_share", "oracle_split_half", "seed_spread", "goal"} <= set(
        figures
    )
    assert (
        "(higher is better)" in text and "(closer to 0 is better)" in text and str(mae_sha(tmp_path)) in text
    )
    rows = read_rows(table)
    first_round = [row for row in rows if row["view"] < -(-mae.cfg.num_patches // len(rows[0]["visible"]))]
    partial = write_table(tmp_path / "partial", first_round[:-1])  # the last set of the last scene gone
    with pytest.raises(InputError, match="not a full cover"):
        evaluate_job.run(replace(cfg, scores=(str(partial),), output=str(tmp_path / "out2")))
    assert not (tmp_path / "out2").exists()


def mae_sha(folder: Path) -> str:
    return ltrp.load_mae(str(folder / "mae.pth")).checkpoint.sha256


def read_rows(table: Path) -> list[dict]:
    return ltrp.read_scores(str(table)).to_pylist()
