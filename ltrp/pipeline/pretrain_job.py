"""MAE pre-training on Ray Train (DDP), on any corpus the scoring job reads, tracked in MLflow.

Data: the corpus's shards (`plan_corpus`) -> Ray Data read tasks (each image's bytes, or why they could
not be read) -> on each worker, `iter_torch_batches` renders the epoch's view of every image as uint8
pixels with the scoring job's own `render_view`, in Ray's prefetch threads. The view is a function of
(seed, image id, epoch), so it is rendered as the batches are formed rather than stored in the dataset.
Images that cannot be decoded are skipped, counted and listed; they never stop the job.

Two objectives, each a `Task` of the loop that `ltrp.pipeline.training_loop` shares with ranker training:
- `MAETask` (--objective mae) follows MAE: random masking (75% by default), MSE on the masked patches,
  raw-pixel targets (what LTRP scores in) or norm-pix ones; the grid logged each epoch shows
  original | masked input | reconstruction.
- `FrequencyTask` (--objective frequency) follows FOLK, or MFM without a teacher (`ltrp.core.folk`): the
  encoder sees every patch of an image whose spectrum a filter cut, drawn per image; the decoder restores
  the image, the loss counts the removed frequencies; an EMA teacher of the encoder, on the unfiltered
  image, is distilled into it, and moves after every step. The grid shows original | filtered | restored.
Both: AdamW (0.9, 0.95), warm-up then cosine, lr = base * batch / 256; the MAE written at the end is the
student (its decoder is what restored the images), in the format every loader reads.

Fault tolerance: a checkpoint every epoch under STORAGE/NAME; a failed worker group is restarted from
the last one (`max_failures`), and launching again with the same name and storage resumes it, in the
same MLflow run.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import mlflow
import numpy as np
import ray
import ray.train
import torch

from ltrp.core.folk import Folk, FolkConfig, draw_filters, teacher_momentum
from ltrp.core.mae import GEOMETRIES, MAE, MAEConfig, random_visible
from ltrp.core.masking import visible_sets
from ltrp.data.checkpoints import save_mae
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
from ltrp.data.sources import Shard, plan_corpus, plan_digest, read_shard
from ltrp.pipeline import runtime, trainer, training_data, training_loop
from ltrp.pipeline.configs import InputError, PretrainConfig, identity_fields
from ltrp.pipeline.training_loop import RunLog, Task, Worker, all_gather_lists, unwrap

EXPERIMENT = "ltrp-pretrain"


@dataclass(frozen=True)
class PretrainSummary:
    """What a pre-training launch did."""

    output: str  # where the final MAE was written
    geometry: str  # the MAE's geometry
    objective: str  # what it learnt: mae or frequency
    epochs: int  # epochs the training has done in all
    start_epoch: int  # the epoch this launch started at (0: a new training, else resumed)
    history: tuple[float, ...]  # mean training loss of every epoch, the first launch's included
    skipped_images: int  # images of the last epoch that could not be decoded
    passed_over: dict[str, int]  # files of the source that are neither images nor tar shards, by suffix
    mlflow_run_id: str  # the training's MLflow run (the same across re-launches)

    @property
    def train_loss(self) -> float:
        return self.history[-1]


def run(cfg: PretrainConfig) -> PretrainSummary:
    """The pre-training job: plans the source, joins (or starts) Ray, trains inside the training's
    MLflow run (experiment ltrp-pretrain; reopened when resuming), then writes the final MAE to
    `cfg.output` with `save_mae` (official layout and names) and logs the loss curve.

    Raises:
        InputError: --source holds no images (before Ray starts or MLflow is touched).
    """
    try:
        corpus = plan_corpus(cfg.source, cfg.shard_size)
    except (OSError, ValueError) as err:  # a missing source, a manifest without uris, ...
        raise InputError(f"--source: {err}") from err
    with trainer.claimed(cfg.storage, cfg.name, "jobs.pretrain_mae", _inputs(cfg, corpus.shards)) as lease:
        runtime.start(EXPERIMENT, workers=cfg.workers, worker_cpus=cfg.worker_cpus)
        resume = trainer.resumed_run_id(cfg.storage, cfg.name)
        tags = {"output": cfg.output, "ray_train_run": cfg.name}
        with trainer.mlflow_run(EXPERIMENT, f"pretrain {cfg.name}", resume, asdict(cfg), tags) as active:
            result = fit(cfg, mlflow.get_tracking_uri(), active.info.run_id, shards=corpus.shards)
            mae, history = load_pretrained(result.checkpoint)
            lease.check()
            save_mae(mae, cfg.output)
            with tempfile.TemporaryDirectory() as folder:
                curve = Path(folder) / "loss_curve.png"
                loss_curve_png(history, curve, cfg.objective)
                mlflow.log_artifact(str(curve))
    return PretrainSummary(
        output=cfg.output,
        geometry=cfg.geometry,
        objective=cfg.objective,
        epochs=len(history),
        start_epoch=int(result.metrics["start_epoch"]),
        history=tuple(history),
        skipped_images=int(result.metrics.get("skipped_images", 0)),
        passed_over=corpus.passed_over,
        mlflow_run_id=active.info.run_id,
    )


def _inputs(cfg: PretrainConfig, shards: list[Shard]) -> dict:
    """What a pre-training learns from and what it learns: a re-launch of its name must agree."""
    source = {"source": trainer.absolute_uri(cfg.source), "plan_digest": plan_digest(shards)}
    return identity_fields(cfg) | source


def mae_config(cfg: PretrainConfig) -> MAEConfig:
    return replace(GEOMETRIES[cfg.geometry], norm_pix=cfg.norm_pix)


def folk_config(cfg: PretrainConfig) -> FolkConfig:
    return FolkConfig(cfg.filters, cfg.taus, cfg.distill_weight, cfg.teacher_momentum)


# -- data ---------------------------------------------------------------------------------------------
@ray.remote(num_cpus=1)
def _count_images(shard_json: str) -> int:
    return sum(1 for _ in read_shard(Shard.from_json(shard_json)))


def read_tasks(cfg: PretrainConfig, shards: list[Shard] | None = None) -> tuple[list[dict], int]:
    """The read tasks of the source and how many images they hold (counting a tar's takes Ray).

    `--max-images` keeps the first N images of the sorted corpus (files, then tar shards in order). The
    kept files are then dealt into read tasks in a seeded random order, so that no task holds a single
    class of an ImageFolder; tar shards stay whole (WebDataset shards are shuffled when written).

    Args:
        shards: `plan_corpus(cfg.source, cfg.shard_size).shards`, if already listed.

    Returns:
        ([{"shard": Shard JSON, "limit": images to read from it}, ...], total images).
    """
    shards = plan_corpus(cfg.source, cfg.shard_size).shards if shards is None else shards
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


def _side_by_side(columns: list[np.ndarray]) -> np.ndarray:
    """Columns of (K, S, S, 3) uint8 images side by side, a row per image, zoomed to at least 96 px."""
    grid = np.concatenate([np.concatenate(list(c), axis=0) for c in columns], axis=1)
    zoom = max(1, math.ceil(96 / columns[0].shape[1]))
    return grid.repeat(zoom, axis=0).repeat(zoom, axis=1)


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
    return _side_by_side([images, _to_uint8(masked), _to_uint8(pasted)])


@torch.no_grad()
def restoration_grid(folk: Folk, images: np.ndarray, kept: torch.Tensor) -> np.ndarray:
    """One row per image: original | filtered input | restoration, as `reconstruction_grid` lays them out.

    Args:
        folk: the model (its mode is left as it was).
        images: (K, S, S, 3) uint8.
        kept: (K, 3, S, S) bool, the frequencies each filter kept.
    """
    device = next(folk.parameters()).device
    filtered, _, restored = folk.restore(to_model_input(images).to(device), kept.to(device))
    return _side_by_side([images, _to_uint8(filtered), _to_uint8(restored)])


def loss_curve_png(losses: list[float], path: str | Path, objective: str) -> None:
    """Training loss per epoch as a PNG (matplotlib, Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    ax.plot(range(len(losses)), losses, marker="o")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss")
    ax.set_title(f"pre-training, objective {objective}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# -- training -----------------------------------------------------------------------------------------
def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Masks differ per epoch and worker, and a resumed epoch draws the same ones again."""
    return (seed * 1_000_003 + epoch) * 1_009 + rank


class MAETask(Task):
    """The MAE learns to reconstruct the patches hidden from its encoder.

    Args:
        cfg: the job's options.
        sample_ids: ids of the images shown in the reconstruction grid.
        samples: (K, S, S, 3) uint8, their center views.
    """

    unit = "images"
    grids = "reconstructions"  # the MLflow folder of the epochs' sample grids

    def __init__(self, cfg: PretrainConfig, sample_ids: list[str], samples: np.ndarray) -> None:
        self.cfg, self.sample_ids, self.samples = cfg, sample_ids, samples
        self.skipped: list[tuple[str, str]] = []  # (uri, reason) of the epoch, every worker's once gathered

    def build(self, worker: Worker) -> MAE:
        if self.cfg.threads and worker.device.type == "cpu":
            torch.set_num_threads(self.cfg.threads)
        return MAE(mae_config(self.cfg))

    def batches(self, epoch: int, worker: Worker) -> Iterator[dict]:
        """{"image": (B, S, S, 3) uint8, "skipped": [(uri, reason), ...]}: the epoch's views, in a
        seeded local shuffle."""
        self.begin_epoch(epoch, worker)
        collate = ViewBatches(
            mae_config(self.cfg).img_size, epoch, seed=self.cfg.seed, crop=self.cfg.crop, flip=self.cfg.flip
        )
        for batch in ray.train.get_dataset_shard("train").iter_torch_batches(
            batch_size=self.cfg.batch_size,
            collate_fn=collate,
            local_shuffle_buffer_size=self.cfg.shuffle_buffer or None,
            local_shuffle_seed=self.cfg.seed + epoch,
        ):
            self.skipped += batch["skipped"]
            yield batch

    def begin_epoch(self, epoch: int, worker: Worker) -> None:
        """Before an epoch's batches: the generator its masks (or filters) are drawn from, seeded so that a
        resumed epoch draws the same ones."""
        self.generator = torch.Generator().manual_seed(_epoch_seed(self.cfg.seed, epoch, worker.rank))
        self.skipped = []

    def loss(self, model: torch.nn.Module, batch: dict, worker: Worker) -> tuple[torch.Tensor, int]:
        mae = unwrap(model)
        imgs = to_model_input(batch["image"].to(worker.device, non_blocking=True))  # (B, 3, S, S)
        # (B, n_visible) sorted indices of the patches shown to the encoder
        n, ratio = mae.cfg.num_patches, self.cfg.mask_ratio
        visible = random_visible(len(imgs), n, ratio, generator=self.generator, device=worker.device)
        with worker.autocast():
            pred = model(imgs, visible)  # (B, N, patch pixels)
        return mae.forward_loss(imgs, pred, visible), len(imgs)

    def end_epoch(self, model: torch.nn.Module, epoch: int, worker: Worker) -> dict[str, float]:
        self.skipped = all_gather_lists(self.skipped)
        return {"skipped_images": len(self.skipped)}

    def checkpoint_state(self, model: torch.nn.Module) -> dict:
        return {"mae_config": asdict(model.cfg)}  # what `load_pretrained` rebuilds it from

    def sample_grid(self, model: torch.nn.Module) -> np.ndarray:
        """The sample images' reconstruction grid, always with the same masks."""
        mae = unwrap(model)
        visible = visible_sets(
            self.sample_ids, grid=mae.cfg.grid, mask_ratio=self.cfg.mask_ratio, seed=self.cfg.seed
        )
        mae.eval()
        return reconstruction_grid(mae, self.samples, visible)

    def log_epoch(self, model: torch.nn.Module, epoch: int, first: bool, run: RunLog) -> None:
        """The epoch's `sample_grid` (folder `grids`); the skipped images once per launch (every epoch
        skips the same ones)."""
        if len(self.samples):
            run.artifact(f"epoch_{epoch:03d}.png", png_bytes(self.sample_grid(model)), self.grids)
        if first and self.skipped:
            listing = [{"uri": uri, "reason": reason} for uri, reason in self.skipped]
            run.artifact("skipped_images.json", json.dumps(listing, indent=1).encode())


class FrequencyTask(MAETask):
    """The MAE learns to restore the frequencies a filter removed from the images its encoder sees
    whole, distilling an EMA teacher of its encoder (FOLK) or not (MFM): `ltrp.core.folk.Folk`."""

    grids = "restorations"

    def build(self, worker: Worker) -> Folk:
        return Folk(super().build(worker), folk_config(self.cfg))

    def loss(self, model: torch.nn.Module, batch: dict, worker: Worker) -> tuple[torch.Tensor, int]:
        imgs = to_model_input(batch["image"].to(worker.device, non_blocking=True))  # (B, 3, S, S)
        kept = draw_filters(imgs, self.cfg.filters, self.cfg.taus, self.generator)  # (B, 3, S, S) bool
        with worker.autocast():
            return model(imgs, kept), len(imgs)

    def after_step(self, model: torch.nn.Module, step: int, total_steps: int) -> None:
        folk = unwrap(model)
        if folk.teacher is not None:
            folk.update_teacher(teacher_momentum(step, total_steps, folk.cfg.momentum))

    def checkpoint_state(self, model: torch.nn.Module) -> dict:
        return {"mae_config": asdict(model.student.cfg), "folk_config": asdict(model.cfg)}

    def sample_grid(self, model: torch.nn.Module) -> np.ndarray:
        """The sample images' restoration grid, always with the same filters."""
        folk = unwrap(model)
        images = to_model_input(torch.from_numpy(self.samples))
        kept = draw_filters(
            images, self.cfg.filters, self.cfg.taus, torch.Generator().manual_seed(self.cfg.seed)
        )
        folk.eval()
        return restoration_grid(folk, self.samples, kept)


def load_pretrained(checkpoint: ray.train.Checkpoint) -> tuple[MAE, list[float]]:
    """A training checkpoint of either objective -> (the MAE in eval mode, train loss of every epoch so
    far). Loaded strictly: a frequency checkpoint's student, teacher and head must all fit."""
    state = training_loop.read_state(checkpoint)
    mae = MAE(MAEConfig(**state["mae_config"]))
    model = Folk(mae, FolkConfig(**state["folk_config"])) if "folk_config" in state else mae
    model.load_state_dict(state["model"])
    return mae.eval(), state["history"]


def fit(
    cfg: PretrainConfig,
    tracking_uri: str | None = None,
    mlflow_run_id: str | None = None,
    shards: list[Shard] | None = None,
) -> ray.train.Result:
    """Pre-trains on the current Ray cluster; returns Ray Train's result (the last checkpoint and its
    metrics). Rank 0 logs each epoch to `mlflow_run_id` if given.

    Args:
        shards: `plan_corpus(cfg.source, cfg.shard_size).shards`, if already listed.
    """
    reads, count = read_tasks(cfg, shards)
    if count == 0:
        raise InputError(f"--source {cfg.source}: no images to train on")
    sample_ids, samples = sample_images(reads, cfg.sample_images, mae_config(cfg).img_size)
    global_batch = cfg.batch_size * cfg.workers
    settings = trainer.settings(
        cfg,
        steps_per_epoch=max(1, math.ceil(count / global_batch)),
        lr=cfg.lr or cfg.base_lr * global_batch / 256,  # MAE's rule
        tracking_uri=tracking_uri,
        mlflow_run_id=mlflow_run_id,
    )
    task = (FrequencyTask if cfg.objective == "frequency" else MAETask)(cfg, sample_ids, samples)
    return trainer.fit(settings, task, {"train": training_data.images_dataset(reads)})
