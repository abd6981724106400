"""Ranker training on Ray Train (DDP), reading a score table, tracked and registered in MLflow.

Data: the score table's rows (one per image view) -> each image decoded and its view replayed with the
scoring job's own `render_view` -> (image, visible, scores) batches. Validation is the views of the
images whose id hashes into `val_fraction`, so the views of an image never straddle the split.

Fault tolerance: a checkpoint every epoch under RunConfig(storage_path, name); a failed worker group is
restarted from the last one (`max_failures`), and running again with the same name resumes it.
"""

from __future__ import annotations

import hashlib
import json
import math
import posixpath
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import ray
import ray.train
import ray.train.torch
import torch

from ltrp.core.losses import LOSSES, listmle_per_row
from ltrp.core.optim import lr_at, param_groups
from ltrp.core.ranker import RANKER_GEOMETRIES, Ranker, RankerConfig
from ltrp.core.ranking_metrics import kendall_tau, ndcg_at_k, spearman, topk_overlap
from ltrp.data.checkpoints import load_ranker
from ltrp.data.images import View, render_view, to_model_input
from ltrp.data.sources import read_many
from ltrp.data.tables import SCORES_SCHEMA, read_scores
from ltrp.pipeline.trainer import all_reduce_sum, log_epoch_metrics, run_trainer


@dataclass
class TrainConfig:
    scores: str  # a scoring job's output (local or s3://)
    name: str = "ltrp-ranker"  # Ray Train run name: running again with the same name resumes
    storage: str = "runs/train"  # checkpoints go to STORAGE/NAME (local or s3://)
    ranker: str = "ltrp_vit_small_patch16"  # see RANKER_GEOMETRIES
    head: str = "cls"  # "cls" (the paper: Linear on CLS -> L) or "token" (per-token head)
    loss: str = "listmle"  # see ltrp.core.losses.LOSSES
    epochs: int = 10
    warmup_epochs: int = 1
    batch_size: int = 64  # views per worker and step
    lr: float | None = None  # None: 1.5e-4 * global batch / 256, the authors' rule
    weight_decay: float = 0.06  # not on norms, biases and tokens
    val_fraction: float = 0.1
    topk: int = 5  # k of NDCG@k and top-k overlap
    workers: int = 1
    use_gpu: bool = False
    worker_cpus: float = 1.0
    max_failures: int = 2
    seed: int = 0
    registered_model: str = "ltrp-ranker"  # MLflow registered model that receives the new version
    alias: str | None = None  # set this alias on the new version (promotion sets "champion")


def ranker_config(cfg: TrainConfig) -> RankerConfig:
    return replace(RANKER_GEOMETRIES[cfg.ranker], head=cfg.head)


def is_validation(image_id: str, fraction: float) -> bool:
    """A pure function of the image id, so every view of an image lands on the same side."""
    digest = hashlib.shake_256(f"ltrp-split\0{image_id}".encode()).digest(8)
    return int.from_bytes(digest, "little") / 2**64 < fraction


def table_metadata(scores_uri: str) -> dict:
    """The scoring job's run metadata (MAE sha256, geometry, ...), from its `_ltrp_job.json`."""
    with fsspec.open(posixpath.join(scores_uri.rstrip("/"), "_ltrp_job.json"), "r") as f:
        return json.load(f)


def _select_split(batch: pa.Table, fraction: float, validation: bool) -> pa.Table:
    keep = [is_validation(i, fraction) == validation for i in batch.column("image_id").to_pylist()]
    return batch.filter(pa.array(keep, pa.bool_()))


def load_views(batch: pa.Table, size: int) -> dict[str, np.ndarray]:
    """Score rows -> image (B, S, S, 3) uint8, visible (B, n) int64, scores (B, n) float32: each row's
    image decoded and its stored view replayed with the scoring job's own `render_view`."""
    data = read_many(batch.column("uri").to_pylist())
    boxes, flips = batch.column("crop_box").to_pylist(), batch.column("flip").to_pylist()
    images = [render_view(d, View(tuple(b), f), size) for d, b, f in zip(data, boxes, flips, strict=True)]
    return {
        "image": np.stack(images),
        "visible": np.asarray(batch.column("visible").to_pylist(), dtype=np.int64),
        "scores": np.asarray(batch.column("scores").to_pylist(), dtype=np.float32),
    }


def read_scores_dataset(uri: str) -> ray.data.Dataset:
    """The score table as a Ray Dataset, for distributed consumers such as ranker training."""
    return ray.data.read_parquet(f"{uri.rstrip('/')}/scores", schema=SCORES_SCHEMA)


def views_dataset(cfg: TrainConfig, validation: bool) -> ray.data.Dataset:
    ds = read_scores_dataset(cfg.scores)
    ds = ds.map_batches(
        _select_split,
        fn_kwargs={"fraction": cfg.val_fraction, "validation": validation},
        batch_format="pyarrow",
    )
    size = ranker_config(cfg).img_size
    return ds.map_batches(load_views, fn_kwargs={"size": size}, batch_format="pyarrow")


def split_counts(cfg: TrainConfig) -> tuple[int, int]:
    """(train views, validation views) of the score table."""
    ids = read_scores(cfg.scores, columns=["image_id"]).column("image_id").to_pylist()
    val = sum(is_validation(i, cfg.val_fraction) for i in ids)
    return len(ids) - val, val


def validate(model: torch.nn.Module, shard, cfg: TrainConfig, device: torch.device) -> dict[str, float]:
    """Mean ListMLE, Kendall tau, Spearman, NDCG@k and top-k overlap against the pseudo-scores,
    over every worker's validation views."""
    model.eval()
    sums = torch.zeros(6, device=device)  # listmle, tau, spearman, ndcg, overlap, count
    with torch.no_grad():
        for batch in shard.iter_torch_batches(batch_size=cfg.batch_size, device=device):
            s = model(to_model_input(batch["image"]), batch["visible"]).float()
            y = batch["scores"]
            k = min(cfg.topk, y.shape[1])
            per_row = torch.stack(
                [
                    listmle_per_row(s, y),
                    kendall_tau(s, y),
                    spearman(s, y),
                    ndcg_at_k(s, y.clamp_min(0), k),
                    topk_overlap(s, y, k),
                ]
            )
            sums[:5] += per_row.sum(dim=1)
            sums[5] += len(y)
    sums = all_reduce_sum(sums)
    count = sums[5].clamp_min(1)
    names = [
        "val_listmle",
        "val_kendall_tau",
        "val_spearman",
        f"val_ndcg_at_{cfg.topk}",
        f"val_top{cfg.topk}_overlap",
    ]
    return {name: (sums[i] / count).item() for i, name in enumerate(names)}


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker."""
    cfg = TrainConfig(**config["cfg"])
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)
    model = Ranker(ranker_config(cfg))
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=config["lr"], betas=(0.9, 0.95))
    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / "state.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = state["epoch"] + 1
    model = ray.train.torch.prepare_model(model)
    loss_fn = LOSSES[cfg.loss]
    steps = config["steps_per_epoch"]
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        total, count = torch.zeros((), device=device), 0
        for i, batch in enumerate(train_shard.iter_torch_batches(batch_size=cfg.batch_size, device=device)):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(
                    epoch * steps + i, cfg.epochs * steps, cfg.warmup_epochs * steps, config["lr"]
                )
            with autocast:
                s = model(to_model_input(batch["image"]), batch["visible"])
            loss = loss_fn(s.float(), batch["scores"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach()
            count += 1
        train_loss = all_reduce_sum(torch.stack([total, torch.tensor(float(count), device=device)]))
        metrics = {
            "epoch": epoch,
            "start_epoch": start_epoch,
            "train_loss": (train_loss[0] / train_loss[1].clamp_min(1)).item(),
            **validate(model, val_shard, cfg, device),
        }
        with tempfile.TemporaryDirectory() as folder:
            saved = None
            if rank == 0:
                inner = model.module if hasattr(model, "module") else model
                torch.save(
                    {
                        "model": inner.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "epoch": epoch,
                        "ranker_config": asdict(inner.cfg),
                    },
                    Path(folder) / "state.pt",
                )
                saved = ray.train.Checkpoint.from_directory(folder)
                if config.get("mlflow_run_id"):
                    log_epoch_metrics(config["mlflow_uri"], config["mlflow_run_id"], metrics, epoch)
            ray.train.report(metrics, checkpoint=saved)


def load_ranker_checkpoint(checkpoint: ray.train.Checkpoint) -> Ranker:
    with checkpoint.as_directory() as folder:
        return load_ranker(str(Path(folder) / "state.pt"))


def fit(
    cfg: TrainConfig, mlflow_uri: str | None = None, mlflow_run_id: str | None = None
) -> ray.train.Result:
    """Trains on the current Ray cluster; returns Ray Train's result (metrics, last checkpoint)."""
    meta = table_metadata(cfg.scores)
    ranker = ranker_config(cfg)
    grid = meta["mae_config"]["img_size"] // meta["mae_config"]["patch_size"]
    if grid != ranker.grid:
        raise ValueError(
            f"{cfg.scores} scores a {grid}x{grid} patch grid; ranker {cfg.ranker} has "
            f"{ranker.grid}x{ranker.grid}"
        )
    train_views, _ = split_counts(cfg)
    global_batch = cfg.batch_size * cfg.workers
    loop_config = {
        "cfg": asdict(cfg),
        "lr": cfg.lr or 1.5e-4 * global_batch / 256,
        "steps_per_epoch": max(1, math.ceil(train_views / global_batch)),
        "mlflow_uri": mlflow_uri,
        "mlflow_run_id": mlflow_run_id,
    }
    datasets = {"train": views_dataset(cfg, validation=False), "val": views_dataset(cfg, validation=True)}
    return run_trainer(train_loop, loop_config, cfg, datasets)
