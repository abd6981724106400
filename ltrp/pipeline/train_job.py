"""Ranker training on Ray Train (DDP), reading a score table, tracked and registered in MLflow.

Data: the score table's views, split by image id (`ltrp.pipeline.training_data`).

The loop is `ltrp.pipeline.trainer`'s, shared with MAE pre-training; `RankerTask` is what differs: the
ranker, the ranking loss of a batch, and validation at the end of each epoch. Fault tolerance: a
checkpoint every epoch under STORAGE/NAME; a failed worker group is restarted from the last one
(`max_failures`), and launching again with the same name and storage resumes it, in the same MLflow run.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import mlflow
import ray
import ray.train
import torch

from ltrp.core.losses import LOSSES, listmle_per_row
from ltrp.core.ranker import RANKER_GEOMETRIES, Ranker, RankerConfig, scores_at
from ltrp.core.ranking_metrics import kendall_tau, ndcg_at_k, spearman, topk_overlap
from ltrp.data.checkpoints import load_ranker
from ltrp.data.images import to_model_input
from ltrp.data.tables import read_job_metadata
from ltrp.pipeline import runtime, trainer
from ltrp.pipeline.configs import InputError, TrainConfig, checking_inputs, registered_name
from ltrp.pipeline.registry import register_ranker
from ltrp.pipeline.trainer import Task, Worker, all_reduce_sum
from ltrp.pipeline.training_data import split_counts, views_dataset

EXPERIMENT = "ltrp-train"


@dataclass(frozen=True)
class TrainSummary:
    """What a training launch did."""

    model: str  # the registered model (NAME of models:/NAME)
    version: str  # the registered version
    alias: str | None  # the alias set on it
    epochs: int  # epochs the training has done in all
    start_epoch: int  # the epoch this launch started at (0: a new training, else resumed)
    metrics: dict[str, float]  # the last epoch's validation metrics (val_*)
    mlflow_run_id: str  # the training's MLflow run (the same across re-launches)


def run(cfg: TrainConfig) -> TrainSummary:
    """The training job: checks the score table, joins (or starts) Ray, trains inside the training's
    MLflow run (experiment ltrp-train; reopened when resuming) with the options as params, then
    registers the ranker as a new version of `cfg.model`, tagged with the table and MAE it learned from.

    Raises:
        InputError: the score table is missing, or scores another patch grid than the ranker's, or
            holds no training views (before Ray starts or MLflow is touched).
    """
    meta, train_views = check_inputs(cfg)
    name = registered_name(cfg.model)
    scores = trainer.absolute_uri(cfg.scores)
    with trainer.claimed(cfg.storage, cfg.name, "jobs.train", _inputs(cfg, meta, scores)) as lease:
        runtime.start(EXPERIMENT, workers=cfg.workers, worker_cpus=cfg.worker_cpus)
        resume = trainer.resumed_run_id(cfg.storage, cfg.name)
        tags = {"score_table": scores, "ray_train_run": cfg.name}
        with trainer.mlflow_run(EXPERIMENT, f"train {cfg.name}", resume, asdict(cfg), tags) as active:
            result = fit(cfg, train_views, mlflow.get_tracking_uri(), active.info.run_id)
            final = {k: float(v) for k, v in result.metrics.items() if k.startswith("val_")}
            lease.check()
            version = register_ranker(
                load_ranker_checkpoint(result.checkpoint),
                name,
                tags={
                    "score_table": scores,
                    "mae_sha256": meta["mae_sha256"],
                    "ray_train_run": cfg.name,
                    **{k: f"{v:.6g}" for k, v in final.items()},
                },
                alias=cfg.alias,
            )
    return TrainSummary(
        model=name,
        version=str(version.version),  # an int from a SQLite registry, a str over REST
        alias=cfg.alias,
        epochs=int(result.metrics["epoch"]) + 1,
        start_epoch=int(result.metrics["start_epoch"]),
        metrics=final,
        mlflow_run_id=active.info.run_id,
    )


def _inputs(cfg: TrainConfig, meta: dict, scores: str) -> dict:
    """What a training learns from and what it learns: a re-launch of its name must agree on these
    (more epochs, another batch size or learning rate may resume it)."""
    table = {k: meta.get(k) for k in meta.get("fingerprint", [])}  # what decides the table's scores
    model = ("ranker", "head", "loss", "training", "val_fraction", "views", "seed")
    data = {"scores": scores, "score_table": table}
    return data | {k: getattr(cfg, k) for k in model}


def check_inputs(cfg: TrainConfig) -> tuple[dict, int]:
    """The score table's metadata and training views, refusing a table the ranker cannot learn from.

    Raises:
        InputError: naming --scores or --ranker.
    """
    with checking_inputs():
        try:
            meta = read_job_metadata(cfg.scores)
        except FileNotFoundError:
            raise InputError(
                f"--scores {cfg.scores}: no _ltrp_job.json there: not the output of a scoring job"
            ) from None
        mae = meta["mae_config"]
        grid, ranker = mae["img_size"] // mae["patch_size"], ranker_config(cfg)
        if grid != ranker.grid:
            raise InputError(
                f"--ranker {cfg.ranker} has a {ranker.grid}x{ranker.grid} patch grid, but --scores "
                f"{cfg.scores} scores {grid}x{grid} patches"
            )
        train_views, val_views = split_counts(cfg)
        if train_views == 0:
            raise InputError(
                f"--scores {cfg.scores}: no views to train on ({val_views} views, all held out by "
                f"--val-fraction {cfg.val_fraction})"
            )
    return meta, train_views


def ranker_config(cfg: TrainConfig) -> RankerConfig:
    return replace(RANKER_GEOMETRIES[cfg.ranker], head=cfg.head)


# -- training -----------------------------------------------------------------------------------------
def validate(
    model: torch.nn.Module, shard: ray.data.DataIterator, cfg: TrainConfig, device: torch.device
) -> dict[str, float]:
    """Mean ListMLE, Kendall tau, Spearman, NDCG@k and top-k overlap against the pseudo-scores, over
    every worker's validation views (all-reduced: every worker must call it). Twice: `val_*` with the
    ranker seeing CLS + the scored patches (the authors' training view), `val_full_*` seeing all L
    patches, as at inference."""
    model.eval()
    sums = torch.zeros(2, 6, device=device)  # (sees, measure): listmle, tau, spearman, ndcg, overlap, count
    with torch.no_grad():
        for batch in shard.iter_torch_batches(batch_size=cfg.batch_size, device=device):
            images, visible, y = (
                to_model_input(batch["image"]),
                batch["visible"],
                batch["scores"],
            )  # y: (B, n)
            k = min(cfg.topk, y.shape[1])
            for row, training in enumerate(("asymmetric", "symmetric")):
                s = scores_at(model, images, visible, training=training).float()  # (B, n)
                per_row = torch.stack(
                    [
                        listmle_per_row(s, y),
                        kendall_tau(s, y),
                        spearman(s, y),
                        ndcg_at_k(s, y.clamp_min(0), k),
                        topk_overlap(s, y, k),
                    ]
                )  # (5, B)
                sums[row, :5] += per_row.sum(dim=1)
                sums[row, 5] += len(y)
    sums = all_reduce_sum(sums)
    names = ["listmle", "kendall_tau", "spearman", f"ndcg_at_{cfg.topk}", f"top{cfg.topk}_overlap"]
    return {
        f"{prefix}_{name}": (sums[row, i] / sums[row, 5].clamp_min(1)).item()
        for row, prefix in enumerate(("val", "val_full"))
        for i, name in enumerate(names)
    }


class RankerTask(Task):
    """The ranker learns to order each view's visible patches as the MAE's pseudo-scores do, seeing
    those patches only (asymmetric) or all L (symmetric)."""

    unit = "views"

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg

    def build(self, worker: Worker) -> Ranker:
        self.train_shard = ray.train.get_dataset_shard("train")
        self.val_shard = ray.train.get_dataset_shard("val")
        if self.cfg.threads and worker.device.type == "cpu":
            torch.set_num_threads(self.cfg.threads)
        return Ranker(ranker_config(self.cfg))

    def batches(self, epoch: int, worker: Worker) -> Iterable[dict[str, torch.Tensor]]:
        """{"image": (B, S, S, 3) uint8, "visible": (B, n) int64, "scores": (B, n) float32} on the device,
        through a seeded local shuffle (the table holds an image's views next to each other)."""
        return self.train_shard.iter_torch_batches(
            batch_size=self.cfg.batch_size,
            device=worker.device,
            local_shuffle_buffer_size=self.cfg.shuffle_buffer or None,
            local_shuffle_seed=self.cfg.seed + epoch,
        )

    def loss(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], worker: Worker
    ) -> tuple[torch.Tensor, int]:
        with worker.autocast():
            s = scores_at(
                model, to_model_input(batch["image"]), batch["visible"], training=self.cfg.training
            )  # (B, n)
        return LOSSES[self.cfg.loss](s.float(), batch["scores"]), len(batch["scores"])

    def end_epoch(self, model: torch.nn.Module, epoch: int, worker: Worker) -> dict[str, float]:
        return validate(model, self.val_shard, self.cfg, worker.device)

    def checkpoint_state(self, model: torch.nn.Module) -> dict:
        return {"ranker_config": asdict(model.cfg)}  # what `load_ranker` rebuilds it from


def load_ranker_checkpoint(checkpoint: ray.train.Checkpoint) -> Ranker:
    with checkpoint.as_directory() as folder:
        return load_ranker(str(Path(folder) / trainer.STATE_FILE))


def fit(
    cfg: TrainConfig,
    train_views: int,
    tracking_uri: str | None = None,
    mlflow_run_id: str | None = None,
) -> ray.train.Result:
    """Trains on the current Ray cluster (checked inputs: `check_inputs`); returns Ray Train's result
    (the last checkpoint and its metrics). Rank 0 logs each epoch to `mlflow_run_id` if given."""
    global_batch = cfg.batch_size * cfg.workers
    settings = trainer.TrainerConfig.of(
        cfg,
        steps_per_epoch=max(1, math.ceil(train_views / global_batch)),
        lr=cfg.lr or 1.5e-4 * global_batch / 256,  # the authors' rule
        tracking_uri=tracking_uri,
        mlflow_run_id=mlflow_run_id,
    )
    size = ranker_config(cfg).img_size
    datasets = {split: views_dataset(cfg, split == "val", size) for split in ("train", "val")}
    return trainer.fit(settings, RankerTask(cfg), datasets)
