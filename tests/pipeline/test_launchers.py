"""The launchers, run as users run them: `python -m jobs.<name>` in a subprocess."""

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str, cwd: Path = ROOT) -> str:
    """Runs a launcher on its embedded defaults: no tracking URI from the test session's environment."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.slow
def test_score_job_demo_defaults_run_from_nothing(tmp_path: Path) -> None:
    stdout = _run("jobs.score", cwd=tmp_path)  # the README's main command, in an empty folder
    assert "randomly initialised demo MAE" in stdout
    assert "scored 7 images (7 rows)" in stdout
    assert pq.read_table(tmp_path / "runs/demo/scores/scores").num_rows == 7
    assert (tmp_path / "mlflow.db").exists()
    again = _run("jobs.score", cwd=tmp_path)  # a second run finds everything done
    assert "scored 0 images (0 rows) and skipped 1 finished shards of 1" in again


def test_benchmark_prints_both_paths_side_by_side() -> None:
    stdout = _run(
        "jobs.bench.scoring", "--geometries", "mae_vit_tiny_patch8", "--batch-size", "2", "--repeats", "1"
    )
    lines = stdout.strip().splitlines()
    assert len(lines) == 2
    assert "reference loop" in lines[0] and "img/s" in lines[0]
    assert "batched" in lines[1] and "x reference" in lines[1]


def test_score_options_come_from_yaml_and_flags_win(tmp_path: Path) -> None:
    from jobs.score import parse_config

    (tmp_path / "score.yaml").write_text("source: s3://b/images\nmae: m.pth\nviews: 3\nseed: 7\nflip: true\n")
    cfg = parse_config(["--config", str(tmp_path / "score.yaml"), "--seed", "9", "--output", "out"])
    assert (cfg.source, cfg.mae, cfg.views, cfg.seed, cfg.flip, cfg.output) == (
        "s3://b/images",
        "m.pth",
        3,
        9,
        True,
        "out",
    )
    assert parse_config(["--mae", "m.pth", "--source", "x", "--no-flip", "--scorers", "2"]).scorers == 2


def test_score_help_explains_every_option() -> None:
    text = _run("jobs.score", "--help")
    for flag in (
        "--source",
        "--mae",
        "--output",
        "--views",
        "--crop",
        "--flip",
        "--precision",
        "--shard-size",
    ):
        assert flag in text


def test_training_benchmark_prints_where_the_time_goes() -> None:
    stdout = _run(
        "jobs.bench.train", "--ranker", "ltrp_vit_micro_patch8", "--batch-size", "4", "--steps", "1"
    )
    lines = stdout.strip().splitlines()
    assert len(lines) == 3
    assert "asymmetric step" in lines[0] and "full step" in lines[1] and "view loading" in lines[2]
    assert all(float(line.split()[-2]) > 0 for line in lines)
