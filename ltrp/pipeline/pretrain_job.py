"""MAE pre-training on Ray Train (DDP), on any corpus the scoring job reads, tracked in MLflow.

Data: the corpus's shards (`plan_shards`) -> Ray Data read tasks (each image's bytes, or why they could
not be read) -> on each worker, `iter_torch_batches` renders the epoch's view of every image as uint8
pixels with the scoring job's own `render_view`, in Ray's prefetch threads. The view is a function of
(seed, image id, epoch), so it is rendered as the batches are formed rather than stored in the dataset.
Images that cannot be decoded are skipped, counted and listed; they never stop the job.

Training follows MAE: random masking (75% by default), MSE on the masked patches, raw-pixel targets
(what LTRP scores in) or norm-pix ones, AdamW (0.9, 0.95), warm-up then cosine, lr = base * batch / 256.

Fault tolerance: a checkpoint every epoch under RunConfig(storage_path, name); a failed worker group is
restarted from the last one (`max_failures`), and running again with the same name resumes it.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from ltrp.core.mae import GEOMETRIES, MAE, MAEConfig, random_visible
from ltrp.core.masking import visible_sets
from ltrp.core.optim import lr_at, param_groups
from ltrp.data.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Crop,
    ImageDecodeError,
    center_crop,
    displayed_size,
    png_bytes,
    render_view,
    to_model_input,
    view_geometry,
)
from ltrp.data.sources import Shard, plan_shards, read_shard
from ltrp.pipeline.trainer import all_reduce_sum, log_epoch_metrics, run_trainer

_IMAGES_SCHEMA = pa.schema(
    [("image_id", pa.string()), ("uri", pa.string()), ("data", pa.binary()), ("error", pa.string())]
)


@dataclass
class PretrainConfig:
    source: str  # folder, s3:// prefix, .tar shard or manifest: see `ltrp.data.sources.plan_shards`
    output: str  # the final MAE (local or s3://), written with `ltrp.save_mae`
    name: str = "ltrp-mae"  # Ray Train run name: running again with the same name resumes
    storage: str = "runs/pretrain"  # checkpoints go to STORAGE/NAME (local or s3://)
    geometry: str = "mae_vit_base_patch16"  # see `ltrp.core.mae.GEOMETRIES`
    norm_pix: bool = False  # per-patch standardised targets; False: raw pixels, what LTRP scores in
    mask_ratio: float = 0.75
    epochs: int = 10
    warmup_epochs: int = 1
    batch_size: int = 64  # images per worker and step
    lr: float | None = None  # None: base_lr * global batch / 256, MAE's rule
    base_lr: float = 1.5e-4
    weight_decay: float = 0.05  # not on norms, biases and tokens
    crop: Crop = "center"  # "random": RandomResizedCrop geometry, scale 0.2-1
    flip: bool = False  # mirror half of the views
    max_images: int | None = None  # only the first N images of the source (in its sorted order)
    shard_size: int = 64  # images per read task
    shuffle_buffer: int = 1024  # images in each worker's local shuffle buffer
    workers: int = 1
    use_gpu: bool = False
    worker_cpus: float = 1.0
    threads: int | None = None  # torch threads of a CPU worker; None: Ray's (one per reserved CPU)
    max_failures: int = 2
    seed: int = 0
    sample_images: int = 8  # fixed images shown in the reconstruction grid each epoch


def mae_config(cfg: PretrainConfig) -> MAEConfig:
    return replace(GEOMETRIES[cfg.geometry], norm_pix=cfg.norm_pix)


# -- data ---------------------------------------------------------------------------------------------
@ray.remote(num_cpus=1)
def _count_images(shard_json: str) -> int:
    return sum(1 for _ in read_shard(Shard.from_json(shard_json)))


def plan_reads(cfg: PretrainConfig) -> tuple[list[dict], int]:
    """The read tasks of the source and how many images they hold.

    `--max-images` keeps the first N images of the sorted plan (files, then tar shards in order). The
    kept files are then dealt into read tasks in a seeded random order, so that no task holds a single
    class of an ImageFolder; tar shards stay whole (WebDataset shards are shuffled when written).

    Returns:
        ([{"shard": Shard JSON, "limit": images to read from it}, ...], total images).
    """
    shards = plan_shards(cfg.source, cfg.shard_size)
    files = [row for s in shards if s.tar is None for row in zip(s.image_ids, s.uris, s.labels, strict=True)]
    tars = [s for s in shards if s.tar is not None]
    tar_counts = ray.get([_count_images.remote(s.to_json()) for s in tars]) if tars else []
    left = len(files) if cfg.max_images is None else cfg.max_images
    files = files[:left]
    left -= len(files)
    tar_reads = []
    for shard, count in zip(tars, tar_counts, strict=True):
        limit = count if cfg.max_images is None else min(count, left)
        if limit > 0:
            tar_reads.append((shard, limit))
            left -= limit
    random.Random(cfg.seed).shuffle(files)
    chunks = [files[i : i + cfg.shard_size] for i in range(0, len(files), cfg.shard_size)]
    reads = [(Shard(k, *map(tuple, zip(*chunk, strict=True))), len(chunk)) for k, chunk in enumerate(chunks)]
    reads += [(replace(s, index=len(chunks) + k), limit) for k, (s, limit) in enumerate(tar_reads)]
    return [{"shard": s.to_json(), "limit": n} for s, n in reads], sum(n for _, n in reads)


def read_images(batch: dict[str, np.ndarray]) -> pa.Table:
    """Read stage: read tasks -> one row per image: its bytes, or the reason it could not be read."""
    rows = [
        {"image_id": image.image_id, "uri": image.uri, "data": image.data, "error": image.error}
        for text, limit in zip(batch["shard"], batch["limit"], strict=True)
        for image in itertools.islice(read_shard(Shard.from_json(str(text))), int(limit))
    ]
    return pa.Table.from_pylist(rows, schema=_IMAGES_SCHEMA)


def images_dataset(reads: list[dict]) -> ray.data.Dataset:
    ds = ray.data.from_items(reads, override_num_blocks=max(1, len(reads)))
    return ds.map_batches(read_images, batch_size=1, batch_format="numpy", num_cpus=1)


class ViewBatches:
    """`collate_fn` of `iter_torch_batches`: a batch of image rows -> {"image": (B, S, S, 3) uint8,
    "skipped": [(uri, reason), ...]}, each image rendered as view number `epoch` (its own crop and
    flip, the scoring job's `view_geometry` and `render_view`); undecodable images are left out."""

    def __init__(self, size: int, epoch: int, *, seed: int, crop: Crop, flip: bool) -> None:
        self.size, self.epoch, self.seed, self.crop, self.flip = size, epoch, seed, crop, flip

    def __call__(self, batch: dict[str, np.ndarray]) -> dict:
        images, skipped = [], []
        for image_id, uri, data, error in zip(
            batch["image_id"], batch["uri"], batch["data"], batch["error"], strict=True
        ):
            try:
                if error is not None:
                    raise ImageDecodeError(error)
                width, height = displayed_size(data)
                view = view_geometry(
                    str(image_id), self.epoch, width, height, seed=self.seed, crop=self.crop, flip=self.flip
                )
                images.append(render_view(data, view, self.size))
            except ImageDecodeError as err:
                skipped.append((str(uri), str(err)))
        pixels = np.stack(images) if images else np.zeros((0, self.size, self.size, 3), np.uint8)
        return {"image": torch.from_numpy(pixels), "skipped": skipped}


def sample_images(reads: list[dict], count: int, size: int) -> tuple[list[str], np.ndarray]:
    """The first `count` decodable images of the plan, center views: (ids, (K, S, S, 3) uint8)."""
    ids, images = [], []
    for read in reads:
        for image in itertools.islice(read_shard(Shard.from_json(read["shard"])), read["limit"]):
            if len(ids) == count:
                break
            try:
                if image.data is not None:
                    images.append(center_crop(image.data, size))
                    ids.append(image.image_id)
            except ImageDecodeError:
                pass  # the training data counts and lists it
        if len(ids) == count:
            break
    return ids, np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)


# -- pictures -----------------------------------------------------------------------------------------
def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """(K, 3, S, S) ImageNet-normalised -> (K, S, S, 3) uint8: `to_model_input` undone."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    pixels = ((x.float().cpu() * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def reconstruction_grid(mae: MAE, images: np.ndarray, visible: torch.Tensor) -> np.ndarray:
    """One row per image: original | masked input (hidden patches grey) | reconstruction, with the
    visible patches pasted in as in MAE's demo (the loss never trains the outputs at visible positions).

    Args:
        mae: the model (its mode is left as it was).
        images: (K, S, S, 3) uint8.
        visible: (K, n) sorted patch indices shown to the encoder.

    Returns:
        (K * S * z, 3 * S * z, 3) uint8, with z an integer zoom making small images at least 96 px.
    """
    device = next(mae.parameters()).device
    x = to_model_input(images).to(device)
    pred = mae(x, visible.to(device)).float()
    if mae.cfg.norm_pix:  # back to pixels with each patch's own statistics, as MAE's demo does
        target = mae.patchify(x)
        pred = pred * (target.var(-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(-1, keepdim=True)
    shown = torch.zeros(len(images), mae.cfg.num_patches, 1, device=device)
    shown.scatter_(1, visible.to(device).unsqueeze(-1), 1.0)
    patches = mae.patchify(x)
    masked = mae.unpatchify(patches * shown)  # 0 = ImageNet mean colour
    pasted = mae.unpatchify(patches * shown + pred * (1 - shown))
    columns = [images, _to_uint8(masked), _to_uint8(pasted)]
    grid = np.concatenate([np.concatenate(list(c), axis=0) for c in columns], axis=1)
    zoom = max(1, math.ceil(96 / images.shape[1]))
    return grid.repeat(zoom, axis=0).repeat(zoom, axis=1)


def loss_curve_png(losses: list[float], path: str | Path) -> None:
    """Training loss per epoch as a PNG (matplotlib, Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    ax.plot(range(len(losses)), losses, marker="o")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss (MSE, masked patches)")
    ax.set_title("MAE pre-training")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# -- training -----------------------------------------------------------------------------------------
def _all_gather(items: list) -> list:
    if not (dist.is_available() and dist.is_initialized()):
        return items
    gathered: list[list] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, items)
    return [x for part in gathered for x in part]


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Masks differ per epoch and worker, and a resumed epoch draws the same ones again."""
    return (seed * 1_000_003 + epoch) * 1_009 + rank


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker."""
    cfg = PretrainConfig(**config["cfg"])
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    if cfg.threads and device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    mae = MAE(mae_config(cfg))
    optimizer = torch.optim.AdamW(param_groups(mae, cfg.weight_decay), lr=config["lr"], betas=(0.9, 0.95))
    start_epoch, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / "state.pt", map_location="cpu", weights_only=True)
        mae.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history = state["epoch"] + 1, state["history"]
    if start_epoch >= cfg.epochs:  # a finished run, started again: no epoch to do
        # Reported with its checkpoint again: Ray's result carries the metrics of the latest checkpoint.
        with tempfile.TemporaryDirectory() as folder:
            saved = None
            if rank == 0:
                torch.save(state, Path(folder) / "state.pt")
                saved = ray.train.Checkpoint.from_directory(folder)
            metrics = {"epoch": start_epoch - 1, "start_epoch": start_epoch, "train_loss": history[-1]}
            ray.train.report(metrics, checkpoint=saved)
        return
    model = ray.train.torch.prepare_model(mae)  # moves `mae` itself to the device, then wraps it in DDP
    shard = ray.train.get_dataset_shard("train")
    steps, grid = config["steps_per_epoch"], mae.cfg.grid
    samples = config["samples"]
    sample_visible = visible_sets(config["sample_ids"], grid=grid, mask_ratio=cfg.mask_ratio, seed=cfg.seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        generator = torch.Generator().manual_seed(_epoch_seed(cfg.seed, epoch, rank))
        collate = ViewBatches(mae.cfg.img_size, epoch, seed=cfg.seed, crop=cfg.crop, flip=cfg.flip)
        sums = torch.zeros(2, device=device)  # sum of loss * images, images
        skipped, lr, started = [], config["lr"], time.perf_counter()
        batches = shard.iter_torch_batches(
            batch_size=cfg.batch_size,
            collate_fn=collate,
            local_shuffle_buffer_size=cfg.shuffle_buffer or None,
            local_shuffle_seed=cfg.seed + epoch,
        )
        for i, batch in enumerate(batches):
            lr = lr_at(epoch * steps + i, cfg.epochs * steps, cfg.warmup_epochs * steps, config["lr"])
            for group in optimizer.param_groups:
                group["lr"] = lr
            skipped += batch["skipped"]
            imgs = to_model_input(batch["image"].to(device, non_blocking=True))
            visible = random_visible(
                len(imgs), mae.cfg.num_patches, cfg.mask_ratio, generator=generator, device=device
            )
            with autocast:
                pred = model(imgs, visible)
            loss = mae.forward_loss(imgs, pred, visible)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sums += torch.stack([loss.detach() * len(imgs), torch.tensor(float(len(imgs)), device=device)])
        sums = all_reduce_sum(sums)
        skipped = _all_gather(skipped)
        seconds = time.perf_counter() - started
        train_loss = (sums[0] / sums[1].clamp_min(1)).item()
        history.append(train_loss)
        metrics = {
            "epoch": epoch,
            "start_epoch": start_epoch,
            "train_loss": train_loss,
            "lr": lr,
            "images_per_second": sums[1].item() / seconds,
            "skipped_images": len(skipped),
        }
        with tempfile.TemporaryDirectory() as folder:
            saved = None
            if rank == 0:
                torch.save(
                    {
                        "model": mae.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "epoch": epoch,
                        "history": history,
                        "mae_config": asdict(mae.cfg),
                    },
                    Path(folder) / "state.pt",
                )
                saved = ray.train.Checkpoint.from_directory(folder)
                print(
                    f"epoch {epoch + 1}/{cfg.epochs}: train_loss {train_loss:.4f}, lr {lr:.3g}, "
                    f"{metrics['images_per_second']:.0f} images/s, {len(skipped)} skipped",
                    flush=True,
                )
                if config.get("mlflow_run_id"):
                    mae.eval()
                    pixels = reconstruction_grid(mae, samples, sample_visible) if len(samples) else None
                    _log_epoch(config, metrics, epoch, pixels, skipped if epoch == start_epoch else None)
            ray.train.report(metrics, checkpoint=saved)


def _log_epoch(
    config: dict, metrics: dict, epoch: int, grid: np.ndarray | None, skipped: list | None
) -> None:
    """Rank 0: the epoch's metrics, its reconstruction grid and (once a run) the skipped images."""
    from mlflow.tracking import MlflowClient

    client, run_id = MlflowClient(config["mlflow_uri"]), config["mlflow_run_id"]
    log_epoch_metrics(config["mlflow_uri"], run_id, metrics, epoch)
    with tempfile.TemporaryDirectory() as folder:
        if grid is not None:
            path = Path(folder) / f"epoch_{epoch:03d}.png"
            path.write_bytes(png_bytes(grid))
            client.log_artifact(run_id, str(path), "reconstructions")
        if skipped:
            path = Path(folder) / "skipped_images.json"
            path.write_text(json.dumps([{"uri": u, "reason": r} for u, r in skipped], indent=1))
            client.log_artifact(run_id, str(path))


def load_pretrained(checkpoint: ray.train.Checkpoint) -> tuple[MAE, list[float]]:
    """A training checkpoint -> (the MAE in eval mode, train loss of every epoch so far)."""
    with checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / "state.pt", map_location="cpu", weights_only=True)
    mae = MAE(MAEConfig(**state["mae_config"]))
    mae.load_state_dict(state["model"])
    return mae.eval(), state["history"]


def fit(
    cfg: PretrainConfig, mlflow_uri: str | None = None, mlflow_run_id: str | None = None
) -> ray.train.Result:
    """Pre-trains on the current Ray cluster; returns Ray Train's result (metrics, last checkpoint)."""
    if cfg.epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {cfg.epochs}")
    if cfg.geometry not in GEOMETRIES:
        raise ValueError(f"unknown geometry {cfg.geometry!r}; one of {sorted(GEOMETRIES)}")
    reads, count = plan_reads(cfg)
    if count == 0:
        raise ValueError(f"{cfg.source}: no images to train on")
    size = mae_config(cfg).img_size
    sample_ids, samples = sample_images(reads, cfg.sample_images, size)
    global_batch = cfg.batch_size * cfg.workers
    loop_config = {
        "cfg": asdict(cfg),
        "lr": cfg.lr or cfg.base_lr * global_batch / 256,
        "steps_per_epoch": max(1, math.ceil(count / global_batch)),
        "sample_ids": sample_ids,
        "samples": samples,
        "mlflow_uri": mlflow_uri,
        "mlflow_run_id": mlflow_run_id,
    }
    return run_trainer(train_loop, loop_config, cfg, {"train": images_dataset(reads)})
