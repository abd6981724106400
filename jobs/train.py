"""Train the LTRP ranker on a score table with Ray Train (DDP), track it in MLflow, register it.

    python -m jobs.train --scores runs/demo/scores                       # defaults: ViT-S/16, 1 worker
    python -m jobs.train --scores s3://bucket/scores/run1 --storage s3://bucket/train --name run1 \\
        --workers 8 --use-gpu --batch-size 512 --epochs 400 --warmup-epochs 40 --alias candidate

Runs on a local Ray, or the cluster that RAY_ADDRESS names. Checkpoints every epoch go to STORAGE/NAME;
running again with the same name and storage resumes from the last one. The driver opens an MLflow run
(MLFLOW_TRACKING_URI, default sqlite:///mlflow.db), rank 0 logs each epoch to it, and the final model
is registered as a new version of --registered-model, tagged with the score table and MAE it learned from.
"""

from __future__ import annotations

from dataclasses import asdict

import mlflow
import ray
from mlflow.entities.model_registry import ModelVersion

from jobs._cli import local_resources, parse_job_values, tracking_uri
from ltrp.pipeline.registry import register_ranker
from ltrp.pipeline.train_job import TrainConfig, fit, load_ranker_checkpoint, table_metadata

HELP = {
    "scores": "output of the scoring job (local or s3://)",
    "name": "run name; running again with the same name and storage resumes it",
    "storage": "where checkpoints go (local or s3://)",
    "ranker": "geometry: ltrp_vit_small_patch16 (the paper), ltrp_vit_tiny_patch16, ltrp_vit_micro_patch8",
    "head": "cls: a Linear on the CLS token scores every position (the paper); token: per-token head",
    "loss": "listmle (the paper), listnet, ranknet or mse",
    "epochs": "epochs",
    "warmup_epochs": "linear warm-up epochs before the cosine decay",
    "batch_size": "views per worker and step",
    "lr": "peak learning rate (default 1.5e-4 * global batch / 256)",
    "weight_decay": "AdamW weight decay (not on norms, biases, tokens)",
    "val_fraction": "fraction of images (by id hash) held out for validation",
    "topk": "k of NDCG@k and top-k overlap",
    "workers": "DDP workers",
    "use_gpu": "one GPU per worker (NCCL); else CPU workers (gloo)",
    "worker_cpus": "CPUs reserved per worker",
    "max_failures": "worker-group restarts from the last checkpoint before the run fails",
    "seed": "seed of the initialisation",
    "registered_model": "MLflow registered model that receives the new version",
    "alias": "alias to set on the new version (e.g. candidate)",
}


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    _, values = parse_job_values(TrainConfig, HELP, "train", __doc__, argv, ("scores",))
    return TrainConfig(**values)


def main(argv: list[str] | None = None) -> ModelVersion:
    cfg = parse_config(argv)
    if not ray.is_initialized():  # the pipeline runs every job in one Ray session
        ray.init(**local_resources(cfg.workers, cfg.worker_cpus))
    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment("ltrp-train")
    meta = table_metadata(cfg.scores)
    with mlflow.start_run(run_name=f"train {cfg.name}") as run:
        mlflow.log_params(asdict(cfg))
        result = fit(cfg, mlflow.get_tracking_uri(), run.info.run_id)
        final = {k: v for k, v in result.metrics.items() if k.startswith("val_")}
        tags = {
            "score_table": cfg.scores,
            "mae_sha256": meta["mae_sha256"],
            "ray_train_run": cfg.name,
            **{k: f"{v:.6g}" for k, v in final.items()},
        }
        version = register_ranker(
            load_ranker_checkpoint(result.checkpoint), cfg.registered_model, tags=tags, alias=cfg.alias
        )
    print(
        f"trained {cfg.ranker} for {cfg.epochs} epochs (this run started at epoch "
        f"{result.metrics['start_epoch']}); "
        + ", ".join(f"{k} {v:.4f}" for k, v in final.items())
        + f"; registered {cfg.registered_model} version {version.version}"
        + (f" as @{cfg.alias}" if cfg.alias else "")
    )
    return version


if __name__ == "__main__":
    main()
