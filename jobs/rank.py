"""Rank the patches of every image of a corpus with a trained ranker, on Ray: a Parquet table with each
view's patch scores and the positions in ranked order.

    python -m jobs.rank --source s3://bucket/images/ --model models:/ltrp-ranker@champion \\
        --output s3://bucket/ranks/run1
    python -m jobs.rank --source images/ --model runs/train/run1/checkpoint_000001/state.pt --output ranks/

--model takes models:/NAME@ALIAS, models:/NAME/VERSION (MLFLOW_TRACKING_URI's registry) or a training
checkpoint file. Runs on a local Ray, or on the cluster that RAY_ADDRESS names. Each run is an MLflow
run (experiment ltrp-rank). Re-running with the same output resumes: finished shards are kept. Read the
table with ltrp.data.tables.read_ranks and top_k.
"""

from __future__ import annotations

import sys

from jobs._cli import parse, run_job
from ltrp.pipeline.configs import RankConfig


def main(argv: list[str] | None = None):
    cfg = parse(RankConfig, "rank", sys.argv[1:] if argv is None else list(argv), prog="python -m jobs.rank")
    from ltrp.pipeline import rank_job  # after parsing: --help and refusals need no torch or Ray

    summary = run_job(rank_job.run, cfg, "python -m jobs.rank")
    print(summary.describe())
    return summary


if __name__ == "__main__":
    main()
