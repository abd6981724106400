"""The job configs check themselves: types, choices, ranges, combinations, and the config files."""

from pathlib import Path
from typing import Any

import pytest
import yaml

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
)

ROOT = Path(__file__).resolve().parents[2]
SPLITS = ("train", "test")
SCORE = {"source": "s", "mae": "m.pth", "output": "o"}
EVALUATE = {"model": "models:/r/1", "mae": "m", "scores": ("t",), "train_source": "a", "test_source": "b"}


FREQUENCY = {"source": "s", "output": "o", "objective": "frequency"}


@pytest.mark.parametrize(
    ("cls", "values", "named"),
    [
        (ScoreConfig, {**SCORE, "crop": "centre"}, "--crop"),
        (ScoreConfig, {**SCORE, "batch_size": "128"}, "--batch-size"),
        (ScoreConfig, {**SCORE, "views": 0}, "--views"),
        (ScoreConfig, {**SCORE, "flip": "yes"}, "--flip"),
        (ScoreConfig, {**SCORE, "mask_ratio": 1.0}, "--mask-ratio"),
        (ScoreConfig, {**SCORE, "precision": "bf16", "device": "cpu"}, "--precision"),
        (ScoreConfig, {**SCORE, "workers": 3, "max_workers": 2}, "--max-workers"),
        (RankConfig, {"source": "s", "model": "r.pt", "output": "o", "max_workers": 0}, "--max-workers"),
        (PretrainConfig, {"source": "s", "output": "o", "geometry": "mae_vit_gigantic"}, "--geometry"),
        (PretrainConfig, {"source": "s", "output": "o", "lr": 0.0}, "--lr"),
        (PretrainConfig, {"source": "s", "output": "o", "objective": "folk"}, "--objective"),
        (PretrainConfig, {"source": "s", "output": "o", "filters": ("com", "bandpass")}, "--filters"),
        (PretrainConfig, {"source": "s", "output": "o", "taus": (0.01, 1.0)}, "--taus: must be in"),
        (PretrainConfig, {"source": "s", "output": "o", "taus": ()}, "--taus"),
        (PretrainConfig, {"source": "s", "output": "o", "teacher_momentum": 1.0}, "--teacher-momentum"),
        (PretrainConfig, {"source": "s", "output": "o", "filters": ("lowpass",)}, "--filters: not an option"),
        (PretrainConfig, {**FREQUENCY, "mask_ratio": 0.5}, "--mask-ratio: not an option of --objective freq"),
        (PretrainConfig, {**FREQUENCY, "norm_pix": True}, "--norm-pix: not an option of --objective freq"),
        (TrainConfig, {"scores": "s", "loss": "listMLE"}, "--loss"),
        (TrainConfig, {"scores": "s", "val_fraction": 1.0}, "--val-fraction"),
        (TrainConfig, {"scores": "s", "register": "ltrp-ranker"}, "--register"),
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


def _paths(path: Path) -> dict[str, dict[str, Any]]:
    """Per section, the values a config file leaves to the pipeline or the command line (paths, the
    model): required fields as `ltrp.pipeline.workflow.Pipeline` derives them from the file's root, and a
    promotion's candidate, which the pipeline gives once the ranker is registered."""
    root = Path(yaml.safe_load(path.read_text())["root"])
    scenes = read_config_file(path, "data").get("dataset", "scenes") == "scenes"
    register = read_config_file(path, "train").get("register", "models:/ltrp-ranker")
    # Scenes: a manifest per split; Fashion-MNIST: an ImageFolder per split.
    source = {s: str(root / "data" / s / "manifest.parquet" if scenes else root / "data" / s) for s in SPLITS}
    mae, scores = str(root / "mae.pth"), {s: str(root / f"scores-{s}") for s in SPLITS}
    return {
        "scenes": {"output": str(root / "data" / "train")},
        "data": {},
        "pretrain": {"source": source["train"], "output": mae},
        "score": {"source": source["train"], "mae": mae, "output": scores["train"]},
        "score_test": {"source": source["test"], "mae": mae, "output": scores["test"]},
        "rank": {"source": source["test"], "model": f"{register}@candidate", "output": str(root / "ranks")},
        "train": {"scores": scores["train"]},
        "evaluate": {
            "model": f"{register}/1",
            "mae": mae,
            "scores": (scores["test"],),
            "train_source": source["train"],
            "test_source": source["test"],
        },
        "promote": {"model": register, "candidate": "1"},
    }


def _from_file(path: Path, section: str) -> tuple[object, dict[str, Any]]:
    """`section`'s config built from the file as a job or the pipeline builds it (and so checked by
    its `__post_init__`), the paths the file cannot give filled in; and the file's own values."""
    values = read_config_file(path, section)
    if section == "score_test":  # the pipeline scores the held-out split with `score` and then these
        values = read_config_file(path, "score") | values
    filled = {k: v for k, v in _paths(path)[section].items() if k not in values}
    return SECTIONS[section](**filled, **values), values


@pytest.mark.parametrize("name", PIPELINE_FILES)
@pytest.mark.parametrize("section", list(SECTIONS))
def test_every_section_of_the_shipped_pipeline_files_builds_its_config(name: str, section: str) -> None:
    cfg, values = _from_file(ROOT / "jobs" / name, section)
    for key, value in values.items():  # the file's values are the ones checked, none replaced
        assert getattr(cfg, key) == (tuple(value) if isinstance(value, list) else value), key


@pytest.mark.parametrize(
    ("section", "key", "bad", "named"),
    [
        ("score", "mask_ratio", 1.0, "--mask-ratio"),
        ("score_test", "cover", -1, "--cover"),
        ("train", "register", "ltrp-scenes", "--register"),
        ("evaluate", "keep_ratios", [0.25, 1.5], "--keep-ratios"),
        ("data", "test_backgrounds", ["sky"], "--test-backgrounds"),
        ("pretrain", "epochs", 0, "--epochs"),
    ],
)
def test_a_bad_value_in_a_pipeline_file_fails_its_section(
    tmp_path: Path, section: str, key: str, bad: object, named: str
) -> None:
    """The test above can fail: jobs/pipeline.yaml with one value made bad is refused, naming it."""
    spec = yaml.safe_load((ROOT / "jobs" / "pipeline.yaml").read_text())
    spec[section][key] = bad
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=named):
        _from_file(path, section)


@pytest.mark.parametrize("name", PIPELINE_FILES)
def test_the_shipped_pipeline_files_configure_every_step(name: str) -> None:
    """Every step's config is built, and so checked, as `python -m jobs.pipeline --config` would."""
    from ltrp.pipeline.workflow import Pipeline

    pipeline = Pipeline(ROOT / "jobs" / name)
    scenes = pipeline.data.dataset == "scenes"
    assert pipeline.evaluate.test_source.endswith("manifest.parquet") is scenes
    assert (pipeline.score["test"].cover > 0) is scenes and pipeline.score["train"].cover == 0


def test_a_judge_file_replaces_the_shipped_mae_and_names_the_steps_by_its_bytes(tmp_path: Path) -> None:
    """data.mae: FILE scores with that file; the same bytes as the shipped MAE plan the same steps (the
    shipped runs are reused), other bytes (the same weights stored in fp32) other ones."""
    import torch

    from ltrp.data.checkpoints import load_mae, save_mae
    from ltrp.data.scenes import SHIPPED_MAE
    from ltrp.pipeline.workflow import Pipeline

    copy, fp32 = tmp_path / "copy.pth", tmp_path / "fp32.pth"
    copy.write_bytes(SHIPPED_MAE.read_bytes())
    save_mae(load_mae(str(SHIPPED_MAE)), str(fp32), dtype=torch.float32)
    pipelines = {}
    for name, mae in (("shipped", "shipped"), ("copy", str(copy)), ("fp32", str(fp32))):
        (tmp_path / f"{name}.yaml").write_text(f"root: {tmp_path / 'run'}\ndata:\n  mae: {mae}\n")
        pipelines[name] = Pipeline(tmp_path / f"{name}.yaml")
    assert pipelines["fp32"].score["train"].mae == str(fp32)
    assert pipelines["copy"].digests == pipelines["shipped"].digests
    assert pipelines["fp32"].digests["score-train"] != pipelines["shipped"].digests["score-train"]
    assert pipelines["fp32"].digests["data"] == pipelines["shipped"].digests["data"]  # the same scenes
