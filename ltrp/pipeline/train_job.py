"""Ranker training on Ray Train (DDP), reading a score table, tracked and registered in MLflow.

Data: the score table's views, split by image id (`ltrp.pipeline.training_data`).

The loop is `ltrp.pipeline.training_loop`'s, shared with MAE pre-training; `RankerTask` is what differs: the
ranker, the ranking loss of a batch, and validation at the end of each epoch. Fault tolerance: a
checkpoint every epoch under STORAGE/NAME; a failed worker group is restarted from the last one
(`max_failures`), and launching again with the same name and storage resumes it, in the same MLflow run.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import mlflow
import ray
import ray.train
import torch
from mlflow.tracking import MlflowClient

from ltrp.core.losses import LOSSES, listmle_per_row
from ltrp.core.masking import visible_count
from ltrp.core.ranker import RANKER_GEOMETRIES, Ranker, RankerConfig, init_from_encoder, scores_at
from ltrp.core.ranking_metrics import kendall_tau, ndcg_at_k, spearman, topk_overlap
from ltrp.data.checkpoints import load_mae, load_ranker
from ltrp.data.images import to_model_input
from ltrp.data.tables import read_job_metadata
from ltrp.pipeline import lineage, runtime, trainer, training_loop
from ltrp.pipeline.configs import InputError, TrainConfig, checking_inputs, identity_fields, registered_name
from ltrp.pipeline.registry import register_ranker
from ltrp.pipeline.training_data import split_counts, views_dataset
from ltrp.pipeline.training_loop import Task, Worker, all_reduce_sum

EXPERIMENT = "ltrp-train"
#: What early stopping watches and the registered checkpoint is the best of.
MONITOR = "val_kendall_tau"


@dataclass(frozen=True)
class TrainSummary:
    """What a training launch did."""

    model: str  # the registered model (NAME of models:/NAME)
    version: str  # the registered version
    alias: str | None  # the alias set on it
    epochs: int  # epochs the training has done in all
    start_epoch: int  # the epoch this launch started at (0: a new training, else resumed)
    best_epoch: int  # the epoch of the registered weights: the best validation Kendall tau
    stopped_early: bool  # whether --patience stopped the training before --epochs
    metrics: dict[str, float]  # the registered epoch's validation metrics (val_*)
    mlflow_run_id: str  # the training's MLflow run (the same across re-launches)


def run(cfg: TrainConfig) -> TrainSummary:
    """The training job: checks the score table, joins (or starts) Ray, trains inside the training's
    MLflow run (experiment ltrp-train; reopened when resuming) with the options as params, then
    registers the ranker as a new version of `cfg.register`, tagged with the table and MAE it learned from.

    Raises:
        InputError: the score table is missing, or scores another patch grid than the ranker's, or
            holds no training views (before Ray starts or MLflow is touched).
    """
    meta, train_views, val_views = check_inputs(cfg)
    name = registered_name(cfg.register)
    scores = trainer.absolute_uri(cfg.scores)
    with trainer.claimed(cfg.storage, cfg.name, "jobs.train", _inputs(cfg, meta, scores)) as lease:
        runtime.start(EXPERIMENT, workers=cfg.workers, worker_cpus=cfg.worker_cpus)
        resume = trainer.resumed_run_id(cfg.storage, cfg.name)
        tags = {"score_table": scores, "ray_train_run": cfg.name}
        with trainer.mlflow_run(EXPERIMENT, f"train {cfg.name}", resume, asdict(cfg), tags) as active:
            table = lineage.dataset(scores, "score table", lineage.table_digest(meta))
            mlflow.log_input(table, context="training")  # lineage: what the registered ranker learned from
            result = fit(cfg, meta, train_views, val_views, mlflow.get_tracking_uri(), active.info.run_id)
            log_validation_curve(active.info.run_id)
            checkpoint, best = trainer.best_checkpoint(result)
            final = {k: float(v) for k, v in best.items() if k.startswith("val_")}
            mlflow.set_tags(
                {"best_epoch": int(best["epoch"]), "stopped_early": bool(best.get("stopped_early"))}
            )
            lease.check()
            version = register_ranker(
                load_ranker_checkpoint(checkpoint),
                name,
                tags={
                    "score_table": scores,
                    "mae_sha256": meta["mae_sha256"],
                    "ray_train_run": cfg.name,
                    "epoch": str(int(best["epoch"])),
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
        best_epoch=int(best["epoch"]),
        stopped_early=bool(result.metrics.get("stopped_early")),
        metrics=final,
        mlflow_run_id=active.info.run_id,
    )


def _inputs(cfg: TrainConfig, meta: dict, scores: str) -> dict:
    """What a training learns from and what it learns: a re-launch of its name must agree on these
    (its identity fields; more epochs, another batch size or learning rate may resume it)."""
    table = {k: meta.get(k) for k in meta.get("fingerprint", [])}  # what decides the table's scores
    return identity_fields(cfg) | {"scores": scores, "score_table": table}


def check_inputs(cfg: TrainConfig) -> tuple[dict, int, int]:
    """The score table's metadata, training and validation views, refusing a table the ranker cannot
    learn from, and an --init the ranker cannot start from.

    Raises:
        InputError: naming --scores, --ranker or --init.
    """
    with checking_inputs():
        try:
            meta = read_job_metadata(cfg.scores)
        except FileNotFoundError:
            raise InputError(
                f"--scores {cfg.scores}: no _ltrp_job.json there: not the output of a scoring job"
            ) from None
        mae = meta["mae_config"]
        grid, ranker = mae["img_size"] // mae["patch_size"], ranker_config(cfg, meta)
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
        if cfg.init == "mae":
            # The workers read the MAE too, from another working directory: resolve a relative path
            # here, where the driver checks it.
            meta = {**meta, "mae_uri": trainer.absolute_uri(meta["mae_uri"])}
            try:
                init_from_encoder(Ranker(ranker), initial_encoder(meta))
            except ValueError as err:
                raise InputError(f"--init mae: {err}; choose a --ranker of the MAE's geometry") from None
    return meta, train_views, val_views


def initial_encoder(meta: dict) -> dict[str, torch.Tensor]:
    """The weights of the MAE that scored the table (--init mae), refused if that file changed since."""
    mae = load_mae(meta["mae_uri"])
    if mae.checkpoint.sha256 != meta["mae_sha256"]:
        raise ValueError(
            f"the table's MAE {meta['mae_uri']} changed since it scored the table (sha256 "
            f"{mae.checkpoint.sha256[:12]}..., the table records {meta['mae_sha256'][:12]}...)"
        )
    return mae.state_dict()


def ranker_config(cfg: TrainConfig, meta: dict) -> RankerConfig:
    """The ranker's geometry and head; trained asymmetric, the table's n is its set size: it then ranks
    in sets of n, as it learned (`ltrp.core.ranker.rank`)."""
    ranker = replace(RANKER_GEOMETRIES[cfg.ranker], head=cfg.head)
    if cfg.training == "symmetric":
        return ranker
    return replace(ranker, set_size=visible_count(ranker.num_patches, meta["mask_ratio"]))


# -- training -----------------------------------------------------------------------------------------
def validate(
    model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]], cfg: TrainConfig, device: torch.device
) -> dict[str, float]:
    """Mean ListMLE, Kendall tau, Spearman, NDCG@k and top-k overlap against the pseudo-scores, over
    every worker's validation views (all-reduced: every worker must call it). Twice: `val_*` with the
    ranker seeing CLS + the scored patches (the authors' training view), `val_full_*` seeing all L
    patches, as at inference."""
    model.eval()
    sums = torch.zeros(2, 6, device=device)  # (sees, measure): listmle, tau, spearman, ndcg, overlap, count
    with torch.no_grad():
        for batch in batches:
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


class ShardViews:
    """One worker's views of a split, as batches {"image": (B, S, S, 3) uint8, "visible": (B, n) int64,
    "scores": (B, n) float32}: streamed from Ray Data every epoch, or, with `cached`, streamed once and
    then served from the worker's memory. Replaying a view (read, decode, crop) costs more CPU than a
    training step of the small rankers, and every epoch replays the same views."""

    def __init__(self, shard: ray.data.DataIterator, cached: bool) -> None:
        self.shard, self.cached = shard, cached
        self.views: dict[str, torch.Tensor] | None = None  # (V, ...) each, once streamed

    def batches(self, batch_size: int, device: torch.device, seed: int | None, buffer: int) -> Iterator[dict]:
        """The epoch's batches; `seed` shuffles them (a local shuffle of `buffer` views when streamed,
        a permutation of all the worker's views when cached), None keeps the table's order."""
        if not self.cached:
            shuffle = {"local_shuffle_buffer_size": buffer or None, "local_shuffle_seed": seed}
            yield from self.shard.iter_torch_batches(
                batch_size=batch_size, device=device, **(shuffle if seed is not None else {})
            )
            return
        if self.views is None:
            parts = list(self.shard.iter_torch_batches(batch_size=1024))
            self.views = {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}
        count = len(next(iter(self.views.values()), ()))
        order = torch.arange(count)
        if seed is not None:
            order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
        for index in order.split(batch_size):
            yield {k: v[index].to(device) for k, v in self.views.items()}


class RankerTask(Task):
    """The ranker learns to order each view's visible patches as the MAE's pseudo-scores do, seeing
    those patches only (asymmetric) or all L (symmetric)."""

    unit = "views"

    def __init__(self, cfg: TrainConfig, meta: dict, cached: dict[str, bool]) -> None:
        self.cfg, self.meta, self.cached = cfg, meta, cached

    def build(self, worker: Worker) -> Ranker:
        self.views = {
            split: ShardViews(ray.train.get_dataset_shard(split), self.cached[split])
            for split in ("train", "val")
        }
        if self.cfg.threads and worker.device.type == "cpu":
            torch.set_num_threads(self.cfg.threads)
        model = Ranker(ranker_config(self.cfg, self.meta))
        if self.cfg.init == "mae":  # a resumed training then loads its checkpoint over these weights
            init_from_encoder(model, initial_encoder(self.meta))
        return model

    def batches(self, epoch: int, worker: Worker) -> Iterable[dict[str, torch.Tensor]]:
        """Shuffled with a seed per epoch: the table holds an image's views next to each other."""
        cfg = self.cfg
        return self.views["train"].batches(
            cfg.batch_size, worker.device, cfg.seed + epoch, cfg.shuffle_buffer
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
        batches = self.views["val"].batches(self.cfg.batch_size, worker.device, None, 0)
        return validate(model, batches, self.cfg, worker.device)

    def checkpoint_state(self, model: torch.nn.Module) -> dict:
        return {"ranker_config": asdict(model.cfg)}  # what `load_ranker` rebuilds it from


def log_validation_curve(run_id: str) -> None:
    """validation_curve.png into the training's run: Kendall tau against every validated epoch (from
    the run's metrics, so a resumed training's curve holds every launch's epochs). Drawn once by the
    driver, after training, so the workers spend nothing on it while a lost one could interrupt them."""
    client = MlflowClient()
    curves = {
        name: sorted((m.step, m.value) for m in client.get_metric_history(run_id, name))
        for name in (MONITOR, "val_full_kendall_tau")
    }
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "validation_curve.png"
        validation_curve_png(curves, path)
        mlflow.log_artifact(str(path))


def validation_curve_png(curves: dict[str, list[tuple[int, float]]], path: Path) -> None:
    """Each metric's (epoch, value) points as a line, epochs counted from 1 (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    for name, points in curves.items():
        ax.plot([e + 1 for e, _ in points], [v for _, v in points], marker="o", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("Kendall tau with the pseudo-scores")
    ax.set_title("ranker validation")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def load_ranker_checkpoint(checkpoint: ray.train.Checkpoint) -> Ranker:
    with checkpoint.as_directory() as folder:
        return load_ranker(str(Path(folder) / training_loop.STATE_FILE))


def fit(
    cfg: TrainConfig,
    meta: dict,
    train_views: int,
    val_views: int,
    tracking_uri: str | None = None,
    mlflow_run_id: str | None = None,
) -> ray.train.Result:
    """Trains on the current Ray cluster (checked inputs: `check_inputs`); returns Ray Train's result
    (its checkpoints, scored by validation Kendall tau, and the last metrics). Rank 0 logs each epoch
    to `mlflow_run_id` if given."""
    global_batch = cfg.batch_size * cfg.workers
    settings = trainer.settings(
        cfg,
        steps_per_epoch=max(1, math.ceil(train_views / global_batch)),
        lr=cfg.lr or 1.5e-4 * global_batch / 256,  # the authors' rule
        tracking_uri=tracking_uri,
        mlflow_run_id=mlflow_run_id,
        monitor=MONITOR,
    )
    ranker = ranker_config(cfg, meta)
    datasets = {split: views_dataset(cfg, split == "val", ranker.img_size) for split in ("train", "val")}
    n = visible_count(ranker.num_patches, meta["mask_ratio"])
    view_bytes = ranker.img_size**2 * 3 + n * 12  # uint8 pixels, int64 positions, float32 scores
    cached = {
        split: math.ceil(views / cfg.workers) * view_bytes <= cfg.cache_mib * 2**20
        for split, views in (("train", train_views), ("val", val_views))
    }
    return trainer.fit(settings, RankerTask(cfg, meta, cached), datasets)
