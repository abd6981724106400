"""Pre-train an MAE with Ray Train (DDP) on any corpus the scoring job reads; track it in MLflow.

    python -m jobs.pretrain_mae --source runs/fmnist/images --output runs/fmnist/mae.pth \\
        --geometry mae_vit_fmnist_patch4 --epochs 3 --batch-size 128 --lr 1e-3 --max-images 20000
    python -m jobs.pretrain_mae --source s3://bucket/imagenet/train --output s3://bucket/mae/run1.pth \\
        --storage s3://bucket/pretrain --name run1 --workers 8 --device gpu --batch-size 512 \\
        --epochs 800 --warmup-epochs 40 --crop random --flip
    python -m jobs.pretrain_mae --config jobs/pipeline.yaml --source runs/pipeline/data/train \\
        --output runs/mae.pth                                             # YAML's pretrain section; flags win

Runs on a local Ray, or the cluster that RAY_ADDRESS names. The source is a folder, s3:// prefix, .tar
shard or manifest, as for python -m jobs.score. Checkpoints every epoch go to STORAGE/NAME; running
again with the same name and storage resumes from the last one, in the same MLflow run (experiment
ltrp-pretrain; MLFLOW_TRACKING_URI, default sqlite:///mlflow.db). Rank 0 logs the loss and learning
rate of each epoch and a reconstruction grid (original | masked input | reconstruction); the driver adds
the loss curve and writes the final MAE to --output with ltrp.save_mae (official layout and names;
ltrp.load_mae and python -m jobs.score --mae read it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from jobs._cli import parse, run_job
from ltrp.pipeline.configs import PretrainConfig

if TYPE_CHECKING:
    from ltrp.pipeline.pretrain_job import PretrainSummary

PROG = "python -m jobs.pretrain_mae"


def main(argv: list[str] | None = None) -> PretrainSummary:
    cfg = parse(PretrainConfig, "pretrain", argv, prog=PROG)
    from ltrp.data.sources import describe_passed_over
    from ltrp.pipeline import pretrain_job  # after parsing: --help and refusals need no torch, Ray or MLflow

    summary = run_job(pretrain_job.run, cfg, PROG)
    skipped = summary.skipped_images
    print(
        f"pre-trained {summary.geometry} (objective {summary.objective}) for {summary.epochs} epochs (this "
        f"run started at epoch {summary.start_epoch}); train_loss {summary.train_loss:.4f}"
        + (f"; skipped {skipped} unreadable images (MLflow: skipped_images.json)" if skipped else "")
        + (f"; {describe_passed_over(summary.passed_over)}" if summary.passed_over else "")
        + f"; wrote {summary.output}; MLflow run {summary.mlflow_run_id}"
    )
    return summary


if __name__ == "__main__":
    main()
