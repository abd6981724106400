"""Pre-train an MAE with Ray Train (DDP) on any corpus the scoring job reads; track it in MLflow.

    python -m jobs.pretrain_mae --source runs/fmnist/images --output runs/fmnist/mae.pth \\
        --geometry mae_vit_fmnist_patch4 --epochs 3 --batch-size 128 --lr 1e-3 --max-images 20000
    python -m jobs.pretrain_mae --source s3://bucket/imagenet/train --output s3://bucket/mae/run1.pth \\
        --storage s3://bucket/pretrain --name run1 --workers 8 --use-gpu --batch-size 512 \\
        --epochs 800 --warmup-epochs 40 --crop random --flip

Runs on a local Ray, or the cluster that RAY_ADDRESS names. The source is a folder, s3:// prefix, .tar
shard or manifest, as for python -m jobs.score. Checkpoints every epoch go to STORAGE/NAME; running
again with the same name and storage resumes from the last one. The driver opens an MLflow run
(experiment "ltrp-pretrain"; MLFLOW_TRACKING_URI, default sqlite:///mlflow.db); rank 0 logs the loss
and learning rate of each epoch and a reconstruction grid (original | masked input | reconstruction);
the driver adds the loss curve and writes the final MAE to --output with ltrp.save_mae (official layout
and names; ltrp.load_mae and python -m jobs.score --mae read it).
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict
from pathlib import Path

import mlflow
import ray

from jobs._cli import local_resources, parse_job_values, tracking_uri
from ltrp.core.mae import GEOMETRIES
from ltrp.data.checkpoints import save_mae
from ltrp.pipeline.pretrain_job import PretrainConfig, fit, load_pretrained, loss_curve_png

HELP = {
    "source": "images: folder, s3:// prefix, .tar shard or .parquet/.csv manifest",
    "output": "where the final MAE goes (local or s3://), e.g. runs/mae.pth",
    "name": "run name; running again with the same name and storage resumes it",
    "storage": "where checkpoints go (local or s3://)",
    "geometry": "MAE geometry: " + ", ".join(GEOMETRIES),
    "norm_pix": "learn per-patch standardised pixels (recorded in the checkpoint); default raw pixels",
    "mask_ratio": "fraction of patches hidden from the encoder",
    "epochs": "epochs",
    "warmup_epochs": "linear warm-up epochs before the cosine decay",
    "batch_size": "images per worker and step",
    "lr": "peak learning rate (default base_lr * global batch / 256)",
    "base_lr": "learning rate per 256 images of global batch (MAE: 1.5e-4)",
    "weight_decay": "AdamW weight decay (not on norms, biases, tokens)",
    "crop": "center: the largest central square; random: RandomResizedCrop geometry, scale 0.2-1",
    "flip": "mirror half of the views",
    "max_images": "use only the first N images of the source (sorted order)",
    "shard_size": "images per read task",
    "shuffle_buffer": "images in each worker's local shuffle buffer (0: none)",
    "workers": "DDP workers",
    "use_gpu": "one GPU per worker (NCCL); else CPU workers (gloo)",
    "worker_cpus": "CPUs reserved per worker",
    "threads": "torch threads of each CPU worker (default: Ray's, one per reserved CPU)",
    "max_failures": "worker-group restarts from the last checkpoint before the run fails",
    "seed": "seed of the initialisation, views, masks and order",
    "sample_images": "fixed images in the reconstruction grid logged each epoch",
}


def parse_config(argv: list[str] | None = None) -> PretrainConfig:
    parser, values = parse_job_values(PretrainConfig, HELP, "pretrain", __doc__, argv, ("source", "output"))
    if values.get("geometry", "mae_vit_base_patch16") not in GEOMETRIES:
        parser.error(f"--geometry must be one of {', '.join(GEOMETRIES)}")
    if values.get("crop", "center") not in ("center", "random"):
        parser.error("--crop must be center or random")
    return PretrainConfig(**values)


def main(argv: list[str] | None = None) -> list[float]:
    """Returns the mean training loss of every epoch."""
    cfg = parse_config(argv)
    if not ray.is_initialized():  # the pipeline runs every job in one Ray session
        ray.init(**local_resources(cfg.workers, cfg.worker_cpus))
    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment("ltrp-pretrain")
    with mlflow.start_run(run_name=f"pretrain {cfg.name}") as run:
        mlflow.log_params(asdict(cfg))
        mlflow.set_tags({"output": cfg.output, "ray_train_run": cfg.name})
        result = fit(cfg, mlflow.get_tracking_uri(), run.info.run_id)
        mae, history = load_pretrained(result.checkpoint)
        save_mae(mae, cfg.output)
        with tempfile.TemporaryDirectory() as folder:
            curve = Path(folder) / "loss_curve.png"
            loss_curve_png(history, curve)
            mlflow.log_artifact(str(curve))
    skipped = result.metrics.get("skipped_images", 0)
    print(
        f"pre-trained {cfg.geometry} for {cfg.epochs} epochs (this run started at epoch "
        f"{result.metrics['start_epoch']}); train_loss {history[-1]:.4f}"
        + (f"; skipped {skipped} unreadable images (MLflow: skipped_images.json)" if skipped else "")
        + f"; wrote {cfg.output}"
    )
    return history


if __name__ == "__main__":
    main()
