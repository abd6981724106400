"""The benchmarks' stand-in scorer (jobs/bench/standin.py) as a plain function, then its job in this
process: the real scorer's rows and schema, at its rate, with a fingerprint of its own."""

import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from support import decode, image, score_config, write_shard

import ltrp
from jobs.bench.standin import StandInScoreJob, StandInScorer
from ltrp.data.tables import SCORES_SCHEMA
from ltrp.pipeline.configs import InputError
from ltrp.pipeline.score_job import ScoreJob
from ltrp.pipeline.score_stages import ShardScorer
from ltrp.pipeline.stages import run_in_process


@pytest.mark.parametrize("mask_ratio", [0.9, 0.25])  # 6 and 48 of the tiny MAE's 64 patches visible
def test_the_stand_in_returns_the_real_scorers_rows_after_its_batch_time(
    tmp_path: Path, mae_path: str, mae: ltrp.MAE, mask_ratio: float
) -> None:
    files = {"a.png": image(0, 60, 90), "b.png": b"junk", "c.png": image(1, 64, 64)}
    cfg = score_config(tmp_path, mae_path, views=2, mask_ratio=mask_ratio)
    batch = decode(cfg, write_shard(tmp_path, 0, files))
    real = ShardScorer(cfg, mae.checkpoint.sha256, gpu=False)(batch)

    started = time.perf_counter()
    stand_in = StandInScorer(views_per_second=100)(batch)
    assert time.perf_counter() - started >= batch.num_rows / 100  # 5 rows: at least 50 ms
    assert stand_in.schema == real.schema
    assert stand_in.drop_columns(["scores"]).equals(real.drop_columns(["scores"]))
    lengths = [None if s is None else len(s) for s in stand_in.column("scores").to_pylist()]
    assert lengths == [None if s is None else len(s) for s in real.column("scores").to_pylist()]
    assert None in lengths and set(lengths) - {None} == {6 if mask_ratio == 0.9 else 48}

    with pytest.raises(ValueError, match="views_per_second"):
        StandInScorer(views_per_second=0)


def test_the_stand_in_job_writes_the_real_jobs_rows_and_is_never_taken_for_it(
    tmp_path: Path, mae_path: str
) -> None:
    write_shard(tmp_path / "corpus", 0, {"a.png": image(0, 60, 90), "b.png": image(1, 64, 64)})
    cfg = score_config(tmp_path, mae_path, source=str(tmp_path / "corpus"), views=2)
    StandInScoreJob(cfg, views_per_second=1000).write(run_in_process, progress=lambda _: None)
    table = pq.read_table(tmp_path / "out" / "scores")
    assert table.num_rows == 4 and table.schema.equals(SCORES_SCHEMA, check_metadata=False)
    scores, visible = (table.column(c).to_pylist() for c in ("scores", "visible"))
    assert all(s == [0.0] * len(v) for s, v in zip(scores, visible, strict=True))
    with pytest.raises(InputError):  # the real job refuses the stand-in's output
        ScoreJob(cfg)


def test_the_feed_benchmark_reads_each_operators_cpu_from_ray_datas_stats() -> None:
    from jobs.bench.feed import _stage, operator_cpu

    stats = (
        "Operator 1 MapBatches(decode_shards): 4 tasks executed, 4 blocks produced in 1.86s\n"
        "* Remote wall time: 164.85ms min, 553.56ms max, 294.19ms mean, 1.18s total\n"
        "* Remote cpu time: 141.97ms min, 258.06ms max, 172.4ms mean, 689.61ms total\n"
        "Operator 2 MapBatches(StandInScorer): 4 tasks executed, 4 blocks produced in 1.48s\n"
        "* Remote cpu time: 11.76ms min, 21.19ms max, 14.79ms mean, 1.5s total\n"
        "Operator 3 MapBatches(commit_shards): 4 tasks executed, 4 blocks produced in 4.26s\n"
        "* Remote cpu time: 7.46us min, 28.16us max, 13.96us mean, 55.83us total\n"
    )
    cpu = {_stage(name): seconds for name, seconds in operator_cpu(stats).items()}
    assert cpu == pytest.approx({"decode": 0.68961, "scorer": 1.5, "commit": 55.83e-6})


def test_the_feed_benchmark_reports_cpu_per_view_with_reading_taken_out_of_decoding() -> None:
    from jobs.bench.feed import Figures, row_of

    cpu = {"decode": 3.0, "scorer": 0.05, "commit": 0.02, "driver": 0.4, "daemons": 0.2, "other": 1.0,
           "s3_server": 0.0}  # fmt: skip
    job = Figures(views=1000, seconds=4.0, cpu=cpu, steady_seconds=2.0, steady_driver=0.1)
    row = row_of(job, read=0.5, key={"nodes": 1}, demand=1500.0)
    assert row["read"] == pytest.approx(0.5) and row["decode"] == pytest.approx(2.5)  # ms a view
    assert row["driver"] == pytest.approx(0.4) and row["views_per_s"] == pytest.approx(250.0)
    assert row["driver_cores"] == pytest.approx(0.05)
    assert row["driver_per_10k_at_demand"] == pytest.approx(0.05 * 1e4 / 1500)


def test_the_feed_benchmarks_marginal_row_cancels_each_jobs_fixed_cost() -> None:
    from jobs.bench.feed import COLUMNS, marginal_row

    fixed, per_view = 12.0, 0.25e-3  # CPU-s a job pays once in every column; CPU-s a view

    def job(views: int, seconds: float) -> dict:  # a row: ms a view by column
        row = {column: 1e3 * (fixed + per_view * views) / views for column in COLUMNS}
        return row | {"job": str(views), "views": views, "views_per_s": views / seconds, "demand": 1500.0}

    row = marginal_row(job(1000, 10.0), job(4000, 25.0))
    assert row["job"] == "marginal" and row["views"] == 3000
    assert all(row[column] == pytest.approx(0.25) for column in COLUMNS)  # ms a view
    assert row["fixed_s"] == pytest.approx(dict.fromkeys(COLUMNS, fixed))
    assert row["views_per_s"] == pytest.approx(3000 / 15.0)
    assert row["driver_cores"] == pytest.approx(per_view * 3000 / 15.0)
    # Machinery: scorer, commit (by the view) and driver, daemons, other (by the second: 0.15 cores).
    assert row["machinery"] == pytest.approx(5 * 0.25) and row["per_second_cores"] == pytest.approx(0.15)
    assert row["machinery_at_demand"] == pytest.approx(2 * 0.25 + 1e3 * 0.15 / 1500)


def test_the_sizing_table_counts_a_nodes_cpu_per_view_and_scales_the_specs_gpu_rate() -> None:
    from jobs.bench.sizing import NODE_COLUMNS, FeedFigures, cores_per_gpu, flops_per_view, gpu_views_per_s

    # The spec's roofline line: MAE-B/16 scoring a view of 19 visible patches is ~218 GFLOP.
    assert flops_per_view("mae_vit_base_patch16", 19) == pytest.approx(218e9, rel=0.1)
    assert gpu_views_per_s("H100", "mae_vit_base_patch16") == pytest.approx(1400)
    assert gpu_views_per_s("L4", "mae_vit_base_patch16") == pytest.approx(1400 * 121 / 989)
    key = {"nodes": 1, "actors": 1, "scores": 19, "K": 4, "job": "marginal"}
    feed = FeedFigures(
        [key | {"storage": s} | dict.fromkeys(NODE_COLUMNS, m) for s, m in (("local", 1.0), ("s3", 2.0))]
    )
    assert feed.node_ms_per_view(4) == pytest.approx(len(NODE_COLUMNS))
    assert cores_per_gpu(feed, "H100", "mae_vit_base_patch16", 4, "s3") == pytest.approx(
        1.4 * 2 * len(NODE_COLUMNS)
    )
    with pytest.raises(KeyError, match="no row"):
        feed.node_ms_per_view(8)
    noisy = FeedFigures([feed.rows[0] | {"other": -0.5}])  # a marginal column within the noise
    assert noisy.node_ms_per_view(4) == pytest.approx(len(NODE_COLUMNS) - 1)
