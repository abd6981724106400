"""The job configs check themselves: types, choices, ranges, combinations, and the config files."""

from dataclasses import fields
from pathlib import Path

import pytest

from ltrp.pipeline.configs import (
    SECTIONS,
    ConfigError,
    DataConfig,
    EvaluateConfig,
    PretrainConfig,
    PromoteConfig,
    RankConfig,
    ScenesConfig,
    ScoreConfig,
    TrainConfig,
    read_config_file,
    registered_name,
    result_fields,
)

ROOT = Path(__file__).resolve().parents[2]
SCORE = {"source": "s", "mae": "m.pth", "output": "o"}
EVALUATE = {"model": "models:/r/1", "mae": "m", "scores": ("t",), "train_source": "a", "test_source": "b"}


@pytest.mark.parametrize(
    ("cls", "values", "named"),
    [
        (ScoreConfig, {**SCORE, "crop": "centre"}, "--crop"),
        (ScoreConfig, {**SCORE, "batch_size": "128"}, "--batch-size"),
        (ScoreConfig, {**SCORE, "views": 0}, "--views"),
        (ScoreConfig, {**SCORE, "flip": "yes"}, "--flip"),
        (ScoreConfig, {**SCORE, "mask_ratio": 1.0}, "--mask-ratio"),
        (ScoreConfig, {**SCORE, "precision": "bf16", "device": "cpu"}, "--precision"),
        (ScoreConfig, {**SCORE, "scorers": 3, "max_scorers": 2}, "--max-scorers"),
        (RankConfig, {"source": "s", "model": "r.pt", "output": "o", "max_rankers": 0}, "--max-rankers"),
        (PretrainConfig, {"source": "s", "output": "o", "geometry": "mae_vit_gigantic"}, "--geometry"),
        (PretrainConfig, {"source": "s", "output": "o", "lr": 0.0}, "--lr"),
        (TrainConfig, {"scores": "s", "loss": "listMLE"}, "--loss"),
        (TrainConfig, {"scores": "s", "val_fraction": 1.0}, "--val-fraction"),
        (TrainConfig, {"scores": "s", "model": "ltrp-ranker"}, "--model"),
        (EvaluateConfig, {**EVALUATE, "keep_ratios": (0.25, 1.5)}, "--keep-ratios"),
        (EvaluateConfig, {**EVALUATE, "model": "models:/r"}, "--model"),
        (PromoteConfig, {"model": "models:/r"}, "--candidate"),
        (PromoteConfig, {"model": "models:/r", "candidate": "1", "rollback": True}, "--candidate"),
        (PromoteConfig, {"model": "models:/r", "rollback": True, "dry_run": True}, "--dry-run"),
        (DataConfig, {"mae": "nowhere/judge.pth"}, "--mae: nowhere/judge.pth is not a file"),
        (DataConfig, {"dataset": "fashion_mnist"}, "--mae"),
        (ScenesConfig, {"output": "o", "photos": "tests"}, "--photos: no .jpg or .png image in folder tests"),
    ],
)
def test_a_bad_value_is_refused_naming_its_option(cls: type, values: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        cls(**values)


def test_good_values_pass_and_yaml_lists_become_tuples() -> None:
    cfg = EvaluateConfig(**{**EVALUATE, "keep_ratios": [0.1, 0.5], "seen_classes": ["Bag"]})
    assert cfg.keep_ratios == (0.1, 0.5) and cfg.seen_classes == ("Bag",)
    assert TrainConfig(scores="s", lr=1).lr == 1  # an int where a float is expected is a number
    assert (
        registered_name(PromoteConfig(model="models:/ltrp-ranker", candidate="candidate").model)
        == "ltrp-ranker"
    )


def test_the_score_fingerprint_is_every_field_but_the_execution_only_ones() -> None:
    cfg = ScoreConfig(**SCORE)
    result = set(result_fields(cfg))
    execution = {
        *("mae", "output", "batch_size", "scorers", "max_scorers", "scorer_cpus", "scorer_threads", "device")
    }
    assert result == {f.name for f in fields(ScoreConfig)} - execution


def test_config_files_name_the_unknown_key(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    for text, message in [
        ("score:\n  batch_sise: 1\n", "unknown key 'batch_sise' in section 'score'"),
        ("trian:\n  epochs: 1\n", "unknown top-level key 'trian'"),
        ("score: 3\n", "section 'score' must be a mapping"),
        ("- a\n- b\n", "expected a mapping"),
    ]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            read_config_file(path, "score")
    with pytest.raises(ConfigError, match="cannot read"):
        read_config_file(tmp_path / "missing.yaml", "score")


def test_a_file_gives_top_level_keys_the_job_knows_then_its_section(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("seed: 3\nviews: 2\nepochs: 7\nroot: r\nscore:\n  views: 5\ntrain:\n  epochs: 9\n")
    assert read_config_file(path, "score") == {"seed": 3, "views": 5}
    assert read_config_file(path, "train") == {"seed": 3, "views": 2, "epochs": 9}


PIPELINE_FILES = ("pipeline.yaml", "pipeline-fmnist.yaml", "benchmark.yaml")


@pytest.mark.parametrize("name", PIPELINE_FILES)
@pytest.mark.parametrize("section", list(SECTIONS))
def test_the_shipped_pipeline_files_are_valid_for_every_job(name: str, section: str) -> None:
    values = read_config_file(ROOT / "jobs" / name, section)
    assert set(values) <= {f.name for f in fields(SECTIONS[section])}


@pytest.mark.parametrize("name", PIPELINE_FILES)
def test_the_shipped_pipeline_files_plan_every_step(name: str) -> None:
    """Every step's config is built, and so checked, as `python -m jobs.pipeline --config` would."""
    from ltrp.pipeline.workflow import Plan

    plan = Plan(ROOT / "jobs" / name)
    scenes = plan.data.dataset == "scenes"
    assert plan.evaluate.test_source.endswith("manifest.parquet") is scenes
    assert (plan.score["test"].cover > 0) is scenes and plan.score["train"].cover == 0


def test_a_judge_file_replaces_the_shipped_mae_and_names_the_steps_by_its_bytes(tmp_path: Path) -> None:
    """data.mae: FILE scores with that file; the same bytes as the shipped MAE plan the same steps (the
    shipped runs are reused), other bytes (the same weights stored in fp32) other ones."""
    import torch

    from ltrp.data.checkpoints import load_mae, save_mae
    from ltrp.data.scenes import SHIPPED_MAE
    from ltrp.pipeline.workflow import Plan

    copy, fp32 = tmp_path / "copy.pth", tmp_path / "fp32.pth"
    copy.write_bytes(SHIPPED_MAE.read_bytes())
    save_mae(load_mae(str(SHIPPED_MAE)), str(fp32), dtype=torch.float32)
    plans = {}
    for name, mae in (("shipped", "shipped"), ("copy", str(copy)), ("fp32", str(fp32))):
        (tmp_path / f"{name}.yaml").write_text(f"root: {tmp_path / 'run'}\ndata:\n  mae: {mae}\n")
        plans[name] = Plan(tmp_path / f"{name}.yaml")
    assert plans["fp32"].score["train"].mae == str(fp32)
    assert plans["copy"].digests == plans["shipped"].digests
    assert plans["fp32"].digests["score-train"] != plans["shipped"].digests["score-train"]
    assert plans["fp32"].digests["data"] == plans["shipped"].digests["data"]  # the same scenes
