"""The launchers, run as users run them: `python -m jobs.<name>` in a subprocess."""

import json
import os
import socket
import subprocess
import sys
from dataclasses import MISSING, fields
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs._cli import parse
from ltrp.pipeline import runtime
from ltrp.pipeline.configs import (
    EvaluateConfig,
    InputError,
    PretrainConfig,
    PromoteConfig,
    RankConfig,
    ScenesConfig,
    ScoreConfig,
    TrainConfig,
    option,
)

ROOT = Path(__file__).resolve().parents[2]
LAUNCHERS = {
    "jobs.score": ScoreConfig,
    "jobs.pretrain_mae": PretrainConfig,
    "jobs.train": TrainConfig,
    "jobs.evaluate": EvaluateConfig,
    "jobs.promote": PromoteConfig,
}


def _launch(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Runs a launcher on its embedded defaults (no tracking URI or Ray address from the test session's
    environment), plus `env`."""
    env = {k: v for k, v in os.environ.items() if k not in {"MLFLOW_TRACKING_URI", "RAY_ADDRESS"}} | (
        env or {}
    )
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def _run(*args: str, cwd: Path = ROOT) -> str:
    proc = _launch(*args, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.slow
def test_score_job_demo_runs_from_nothing(
    tmp_path: Path, ray_address: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    proc = _launch("jobs.score", "--demo", cwd=tmp_path)  # in an empty folder: a local Ray, SQLite MLflow
    assert proc.returncode == 0, proc.stderr
    assert "scored 7 images (7 rows)" in proc.stdout
    # Off a terminal: the job's own progress lines, not Ray Data's progress bars logged every 10 s.
    assert "committed shard 0" in proc.stdout and "Progress will be logged" not in proc.stderr
    assert pq.read_table(tmp_path / "runs/demo/scores/scores").num_rows == 7
    assert (tmp_path / "mlflow.db").exists()

    from jobs.score import main  # a second run, in this process (on the session's Ray): all done

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    main(["--demo"])
    assert "scored 0 images (0 rows) and skipped 1 finished shards of 1" in capsys.readouterr().out


def test_benchmark_prints_both_paths_side_by_side() -> None:
    stdout = _run(
        "jobs.bench.scoring", "--geometries", "mae_vit_tiny_patch8", "--batch-size", "2", "--repeats", "1"
    )
    lines = stdout.strip().splitlines()
    assert len(lines) == 2
    assert "reference loop" in lines[0] and "img/s" in lines[0]
    assert "batched" in lines[1] and "x reference" in lines[1]


def test_options_come_from_yaml_top_level_then_section_and_flags_win(tmp_path: Path) -> None:
    (tmp_path / "score.yaml").write_text(
        "source: s3://b/images\nmae: m.pth\nviews: 3\nseed: 7\nflip: true\n"
        "score:\n  views: 4\ntrain:\n  epochs: 9\n"  # another job's section is allowed, and ignored here
    )
    argv = ["--config", str(tmp_path / "score.yaml"), "--seed", "9", "--output", "out"]
    cfg = parse(ScoreConfig, "score", argv, prog="score")
    assert (cfg.source, cfg.mae, cfg.views, cfg.seed, cfg.flip, cfg.output) == (
        "s3://b/images",
        "m.pth",
        4,
        9,
        True,
        "out",
    )
    flags = [
        "--mae",
        "m.pth",
        "--source",
        "x",
        "--output",
        "o",
        "--no-flip",
        "--workers",
        "2",
        "--crop",
        "random",
    ]
    assert parse(ScoreConfig, "score", flags, prog="score").workers == 2


#: every launcher that reads --config -> its config, its section of a config file, and values of its
#: required options
SECTION_OF = {
    "jobs.scenes": (ScenesConfig, "scenes", {"output": "out"}),
    "jobs.score": (ScoreConfig, "score", {"source": "src", "mae": "m.pth", "output": "out"}),
    "jobs.rank": (RankConfig, "rank", {"source": "src", "model": "models:/m@champion", "output": "out"}),
    "jobs.pretrain_mae": (PretrainConfig, "pretrain", {"source": "src", "output": "m.pth"}),
    "jobs.train": (TrainConfig, "train", {"scores": "scores"}),
    "jobs.evaluate": (
        EvaluateConfig,
        "evaluate",
        {
            "model": "models:/m@candidate",
            "mae": "m.pth",
            "scores": ("s",),
            "train_source": "a",
            "test_source": "b",
        },
    ),
    "jobs.promote": (PromoteConfig, "promote", {"model": "models:/m", "candidate": "staging"}),
}


@pytest.mark.parametrize("module", list(SECTION_OF))
def test_every_launcher_reads_its_section_and_names_a_bad_key(module: str, tmp_path: Path) -> None:
    """Top-level keys give the required options, and the job's own section wins over them (its `seed`,
    or promote's `candidate`): the launcher's config has them. A misspelt key in that section exits 2
    naming it, before the job starts."""
    cls, section, values = SECTION_OF[module]
    assert set(values) >= {
        f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
    }
    key, top_value, own_value = (
        ("candidate", "staging", "candidate") if module == "jobs.promote" else ("seed", 3, 5)
    )
    top = "".join(f"{name}: {json.dumps(value)}\n" for name, value in (values | {key: top_value}).items())
    (tmp_path / "job.yaml").write_text(f"{top}{section}:\n  {key}: {json.dumps(own_value)}\n")
    cfg = parse(cls, section, ["--config", str(tmp_path / "job.yaml")], prog=module)
    assert getattr(cfg, key) == own_value
    assert all(getattr(cfg, name) == value for name, value in values.items() if name != key)
    (tmp_path / "bad.yaml").write_text(f"{top}{section}:\n  sede: 5\n")
    proc = _launch(module, "--config", str(tmp_path / "bad.yaml"), cwd=tmp_path)
    assert proc.returncode == 2 and "'sede'" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    ("args", "yaml_text", "named"),
    [
        (["--crop", "centre"], None, "--crop"),
        (["--metric", "L1"], None, "--metric"),
        (["--mode", "Decoder"], None, "--mode"),
        (["--precision", "fp64"], None, "--precision"),
        (["--mask-ratio", "1.0"], None, "--mask-ratio"),
        (["--precision", "fp16", "--device", "cpu"], None, "--precision"),
        ([], "score:\n  batch_sise: 64\n", "batch_sise"),
        ([], "batch_sise: 64\n", "batch_sise"),
        ([], "batch_size: '128'\n", "--batch-size"),
    ],
    ids=[
        "crop",
        "metric",
        "mode",
        "precision",
        "mask-ratio",
        "fp16-on-cpu",
        "section-key",
        "top-key",
        "yaml-type",
    ],
)
def test_bad_options_are_refused_before_anything_starts(
    tmp_path: Path, args: list[str], yaml_text: str | None, named: str
) -> None:
    """Exit 2 and a message naming the option, quickly, with nothing written (no MLflow store, no output)."""
    if yaml_text is not None:
        (tmp_path / "job.yaml").write_text(yaml_text)
        args = [*args, "--config", str(tmp_path / "job.yaml")]
    before = set(tmp_path.iterdir())
    proc = _launch("jobs.score", "--source", "src", "--mae", "m.pth", "--output", "out", *args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert named in proc.stderr
    assert set(tmp_path.iterdir()) == before


def test_missing_inputs_are_refused_before_ray_and_mlflow(tmp_path: Path) -> None:
    proc = _launch(
        "jobs.score", "--source", "nowhere", "--mae", "missing.pth", "--output", "out", cwd=tmp_path
    )
    assert proc.returncode == 2 and "missing.pth" in proc.stderr and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []  # no mlflow.db, no output


def test_a_blank_tracking_uri_is_refused_before_anything_starts(tmp_path: Path) -> None:
    """envsubst renders an unset variable as "": exit 2 naming it, nothing written (no SQLite file)."""
    env = {"MLFLOW_TRACKING_URI": ""}
    proc = _launch(
        "jobs.score", "--source", "src", "--mae", "m.pth", "--output", "out", cwd=tmp_path, env=env
    )
    assert proc.returncode == 2 and "MLFLOW_TRACKING_URI" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and list(tmp_path.iterdir()) == []


def _tracking_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for name in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "RAY_JOB_CONFIG_JSON_ENV_VAR"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize(
    "env",
    [
        {"MLFLOW_TRACKING_URI": " "},
        {"RAY_JOB_CONFIG_JSON_ENV_VAR": "{}"},  # a submitted Ray job, the store left to its default
        {"RAY_JOB_CONFIG_JSON_ENV_VAR": "{}", "MLFLOW_TRACKING_URI": "sqlite:////data/mlflow.db"},
        {"RAY_ADDRESS": "10.255.255.1:6379", "MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"},
        {"RAY_ADDRESS": "ray://head.example:10001", "MLFLOW_TRACKING_URI": "file:///tmp/mlruns"},
        {"RAY_ADDRESS": "http://head.example:8265", "MLFLOW_TRACKING_URI": "/tmp/mlruns"},
    ],
    ids=["blank", "submitted-default", "submitted-sqlite", "remote-sqlite", "client-file", "dashboard-path"],
)
def test_a_store_that_would_be_lost_with_the_node_is_refused(
    env: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _tracking_env(monkeypatch, env)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="MLFLOW_TRACKING_URI"):
        runtime.tracking_uri()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "sqlite:///{cwd}/mlflow.db"),  # the embedded default, here
        ({"RAY_ADDRESS": "127.0.0.1:6379"}, "sqlite:///{cwd}/mlflow.db"),  # a cluster on this machine
        ({"RAY_ADDRESS": f"{socket.gethostname()}:6379"}, "sqlite:///{cwd}/mlflow.db"),  # by its name
        (
            {"RAY_JOB_CONFIG_JSON_ENV_VAR": "{}", "MLFLOW_TRACKING_URI": "http://mlflow:5000"},
            "http://mlflow:5000",
        ),
        (
            {"RAY_ADDRESS": "10.0.0.7:6379", "MLFLOW_TRACKING_URI": "postgresql://db/mlflow"},
            "postgresql://db/mlflow",
        ),
    ],
    ids=["default", "local-cluster", "local-by-name", "submitted-server", "remote-database"],
)
def test_a_store_that_outlives_the_node_is_used(
    env: dict, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _tracking_env(monkeypatch, env)
    monkeypatch.chdir(tmp_path)
    assert runtime.tracking_uri() == expected.format(cwd=tmp_path)


def test_install_size_benchmark_measures_each_lock_here() -> None:
    """The worker lock is a strict subset of the head's, so its installed size is smaller; the dev lock
    is this environment, so every package it pins is measured."""
    from jobs.bench import install_size

    sizes = install_size.main([])
    assert 0 < sizes["worker"] < sizes["head"] <= sizes["dev"]


def test_off_a_terminal_mlflow_draws_no_artifact_progress_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    """A job's log gets no redraw per downloaded file (pytest's stderr is not a terminal); a user's
    own setting stays."""
    monkeypatch.setenv(runtime.MLFLOW_PROGRESS_BAR, "")  # recorded, so that the undo removes it
    monkeypatch.delenv(runtime.MLFLOW_PROGRESS_BAR)
    runtime.quiet_off_a_terminal()
    assert os.environ[runtime.MLFLOW_PROGRESS_BAR] == "false"
    monkeypatch.setenv(runtime.MLFLOW_PROGRESS_BAR, "true")
    runtime.quiet_off_a_terminal()
    assert os.environ[runtime.MLFLOW_PROGRESS_BAR] == "true"


def test_required_options_are_required(tmp_path: Path) -> None:
    proc = _launch("jobs.score", cwd=tmp_path)
    assert proc.returncode == 2
    assert all(flag in proc.stderr for flag in ("--source", "--mae", "--output"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("module", list(LAUNCHERS))
def test_help_shows_every_option_its_default_and_what_is_required(module: str) -> None:
    text = " ".join(_run(module, "--help").split())  # rich wraps lines: compare on words
    for f in fields(LAUNCHERS[module]):
        assert option(f.name) in text, f.name
    assert "--config" in text
    required = [f for f in fields(LAUNCHERS[module]) if f.default is MISSING]
    assert text.count("(required)") == len(required)
    assert "(default: " in text


def test_training_benchmark_prints_where_the_time_goes() -> None:
    tiny = ("--ranker", "ltrp_vit_micro_patch8", "--batch-size", "4", "--steps", "1", "--images", "4")
    stdout = _run("jobs.bench.train", *tiny, "--views", "2")
    lines = stdout.strip().splitlines()
    assert len(lines) == 6
    assert "asymmetric step" in lines[0] and "full step" in lines[1]
    ways = ["replay, an image's views", "cached pixels (zstd)", "cached pixels (none)"]
    assert all(f"2 views per JPEG, {way}: " in line for way, line in zip(ways, lines[2:5], strict=True))
    rates = [float(line.split(" img/s")[0].split()[-1]) for line in lines[:2]]
    rates += [float(line.split(" views/s")[0].split()[-1]) for line in lines[2:5]]
    assert all(rate > 0 for rate in rates)
    assert "on disk: cached pixels per view zstd" in lines[5]


def test_output_files_benchmark_prints_both_layouts_on_both_storages() -> None:
    stdout = _run("jobs.bench.files", "--shards", "4", "--shard-size", "8", "--file-shards", "2")
    lines = stdout.strip().splitlines()
    layouts = [(storage, shards) for storage in ("local", "s3") for shards in (1, 2)]
    assert [line.split(":")[0] for line in lines] == [f"files {s} file_shards={f}" for s, f in layouts]
    assert [int(line.split(": ")[1].split()[0]) for line in lines] == [4, 2, 4, 2]  # files in the table
    assert all("(32 rows)" in line for line in lines)
