"""Ray Train (DDP) plumbing shared by MAE pre-training and ranker training."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sums over the DDP workers (in place); the identity outside DDP."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values)
    return values


def log_epoch_metrics(tracking_uri: str, run_id: str, metrics: dict, epoch: int) -> None:
    """Rank 0: an epoch's metrics (all but "epoch", the step) into the driver's MLflow run."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    now = int(1000 * time.time())
    batch = [Metric(k, float(v), now, epoch) for k, v in metrics.items() if k not in ("epoch",)]
    MlflowClient(tracking_uri).log_batch(run_id, metrics=batch)


def run_trainer(
    train_loop: Callable[[dict], None], loop_config: dict, cfg, datasets: dict
) -> ray.train.Result:
    """Runs `train_loop` on Ray Train (DDP) with the job's scaling, checkpoint storage (STORAGE/NAME:
    a second run with the same name resumes) and restarts. `cfg` is a TrainConfig or a PretrainConfig."""
    storage = cfg.storage if "://" in cfg.storage else os.path.abspath(cfg.storage)  # Ray wants absolute
    trainer = ray.train.torch.TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.workers, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": cfg.worker_cpus}
        ),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
        ),
        datasets=datasets,
    )
    return trainer.fit()
