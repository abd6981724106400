"""Train the LTRP ranker on a score table with Ray Train (DDP), track it in MLflow, register it.

    python -m jobs.train --scores runs/demo/scores                       # defaults: ViT-S/16, 1 worker
    python -m jobs.train --scores s3://bucket/scores/run1 --storage s3://bucket/train --name run1 \\
        --workers 8 --device gpu --batch-size 512 --epochs 400 --warmup-epochs 40 \\
        --register models:/ltrp-ranker --alias candidate
    python -m jobs.train --config jobs/pipeline.yaml --scores runs/pipeline/scores-train   # YAML; flags win

Runs on a local Ray, or the cluster that RAY_ADDRESS names. A validation and a checkpoint every
--validate-every epochs go to STORAGE/NAME; running again with the same name and storage resumes from
the last one, in the same MLflow run (MLFLOW_TRACKING_URI, default sqlite:///mlflow.db; experiment
ltrp-train), to which rank 0 logs each epoch. --patience stops the training when validation Kendall
tau stops improving. The best epoch's ranker is registered as a new version of --register, tagged with
the score table and MAE it learned from.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from jobs._cli import parse, run_job
from ltrp.pipeline.configs import TrainConfig

if TYPE_CHECKING:
    from ltrp.pipeline.train_job import TrainSummary

PROG = "python -m jobs.train"


def main(argv: list[str] | None = None) -> TrainSummary:
    cfg = parse(TrainConfig, "train", argv, prog=PROG)
    from ltrp.pipeline import train_job  # after parsing: --help and refusals need no torch, Ray or MLflow

    summary = run_job(train_job.run, cfg, PROG)
    print(
        f"trained {cfg.ranker} for {summary.epochs} epochs (this run started at epoch "
        f"{summary.start_epoch})"
        + ("; stopped early (--patience)" if summary.stopped_early else "")
        + f"; best validation at epoch {summary.best_epoch + 1}: "
        + ", ".join(f"{k} {v:.4f}" for k, v in summary.metrics.items())
        + f"; registered {summary.model} version {summary.version}"
        + (f" as @{summary.alias}" if summary.alias else "")
        + f"; MLflow run {summary.mlflow_run_id}"
    )
    return summary


if __name__ == "__main__":
    main()
