"""The training loop of every training job (MAE pre-training, ranker training): the side of Ray Train
(DDP) that runs inside each of its workers, where `ltrp.pipeline.trainer.fit` (the driver) starts it.

A job describes what it trains as a `Task`: the model, the batches of an epoch, the loss of one batch,
its end-of-epoch metrics (validation), what its checkpoints hold besides the weights, and what rank 0
logs besides the metrics. The loop owns what the jobs share:

- resuming from the last checkpoint, so that a restarted worker group (`max_failures`) and a second
  launch with the same name and storage both carry on where the training stopped;
- AdamW (0.9, 0.95), weight decay on weight matrices only, the learning rate set every step (linear
  warm-up, then cosine);
- bf16 autocast on CUDA (`Worker.autocast`, which the task wraps around its forward pass);
- each epoch: the loss averaged over every worker's samples, and the metrics logged by rank 0 into the
  driver's MLflow run; every `validate_every` epochs and after the last, the task's validation and a
  checkpoint written by rank 0 and reported to Ray Train (scored by `monitor`, so the best one is
  known);
- early stopping: after `patience` validations without a better `monitor`, every worker stops.

A checkpoint is a folder holding `state.pt` (weights, optimiser, progress) and `run.json`, the MLflow
run the training logs to, which the driver reads before a launch to reopen that run.

`train_epoch` also runs in a plain process, without Ray Train (jobs/experiments/convergence.py).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from ltrp.core.optim import lr_at, param_groups

#: The checkpoint's training state: {"model", "optimizer", "epoch", "history", ...the task's}.
STATE_FILE = "state.pt"
#: The checkpoint's MLflow run, {"mlflow_run_id", "epoch"}: small, so that a driver reads it without
#: downloading the weights.
RUN_FILE = "run.json"


# -- configuration ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainerConfig:
    """What the loop needs from a job: where Ray Train runs and keeps checkpoints, and the schedule. The
    driver builds it from the job's config (`ltrp.pipeline.trainer.settings`)."""

    name: str  # Ray Train run name: checkpoints go to STORAGE/NAME, and a second launch resumes
    storage: str  # local folder or URL (s3://)
    workers: int  # DDP workers
    worker_cpus: float  # CPUs reserved per worker
    use_gpu: bool  # one GPU per worker (NCCL), else CPU workers (gloo)
    max_failures: int  # worker-group restarts from the last checkpoint before the run fails
    keep_checkpoints: int  # checkpoints kept beside the latest: the best by `monitor`, else the last
    epochs: int
    warmup_epochs: int
    steps_per_epoch: int  # optimiser steps of one epoch on each worker (for the schedule)
    lr: float  # peak learning rate
    weight_decay: float
    seed: int  # seed of the initialisation
    tracking_uri: str | None = None  # MLflow server rank 0 logs to; None: no logging
    mlflow_run_id: str | None = None  # the driver's run; recorded in every checkpoint
    validate_every: int = 1  # the task's end-of-epoch metrics (and a checkpoint) every N epochs and last
    monitor: str | None = None  # a metric of `Task.end_epoch` to maximise: the best checkpoint's measure
    patience: int | None = None  # stop after N validations without a better `monitor` (None: never)

    def validates(self, epoch: int) -> bool:
        """Whether `epoch` ends with the task's metrics and a checkpoint: every `validate_every`-th
        epoch and the last one."""
        return (epoch + 1) % self.validate_every == 0 or epoch + 1 == self.epochs


@dataclass(frozen=True)
class Worker:
    """The Ray Train worker a task runs on."""

    rank: int  # 0 writes checkpoints and logs to MLflow
    world_size: int
    device: torch.device

    @classmethod
    def current(cls) -> Worker:
        context = ray.train.get_context()
        return cls(context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device())

    def autocast(self) -> AbstractContextManager:
        """bf16 autocast on CUDA (ViT training's usual precision), a no-op on the CPU."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")


@dataclass(frozen=True)
class RunLog:
    """Rank 0's handle on the driver's MLflow run."""

    # MLflow is imported where it is used: only rank 0 logs, and the loop itself needs none of it.
    tracking_uri: str
    run_id: str

    def metrics(self, metrics: dict[str, float], step: int) -> None:
        """`metrics` at `step` (the epoch), in one request."""
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        now = int(1000 * time.time())
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        MlflowClient(self.tracking_uri).log_batch(self.run_id, metrics=batch)

    def artifact(self, name: str, data: bytes, folder: str | None = None) -> None:
        """`data` as the artifact FOLDER/NAME (replacing one of that name)."""
        from mlflow.tracking import MlflowClient

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_bytes(data)
            MlflowClient(self.tracking_uri).log_artifact(self.run_id, str(path), folder)


class Task:
    """What a training job trains, and how. One copy per worker (Ray pickles it to each), so a task may
    keep that worker's state between its calls, e.g. the data shard or what an epoch skipped.

    Attributes:
        unit: what one sample is, for the throughput metric (`images` -> images_per_second).
    """

    unit = "samples"

    def build(self, worker: Worker) -> torch.nn.Module:
        """Once per worker, before training: the model, freshly initialised (torch is seeded) on the
        CPU; the loop restores the checkpoint into it and moves it to `worker.device`. Also the place
        to take the worker's dataset shards (`ray.train.get_dataset_shard`)."""
        raise NotImplementedError

    def batches(self, epoch: int, worker: Worker) -> Iterable[Any]:
        """This worker's batches of `epoch` (a resumed epoch must draw the same ones)."""
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: Any, worker: Worker) -> tuple[torch.Tensor, int]:
        """One batch's mean loss (a scalar to backpropagate) and the number of samples it averages.

        Args:
            model: the model in training mode, wrapped in DDP when there are several workers
                (`unwrap` gives the model itself).
        """
        raise NotImplementedError

    def after_step(self, model: torch.nn.Module, step: int, total_steps: int) -> None:
        """After each optimiser step (`step` of `total_steps` in the whole training): e.g. moving an EMA
        teacher. Every worker runs it on identical weights, so what it changes stays identical."""

    def end_epoch(self, model: torch.nn.Module, epoch: int, worker: Worker) -> dict[str, float]:
        """Metrics of the epoch besides the training loss (e.g. validation), on the epochs that
        `TrainerConfig.validates`. Runs on every worker, so it may all-reduce; rank 0's values are
        reported, and `TrainerConfig.monitor` names one of them."""
        return {}

    def checkpoint_state(self, model: torch.nn.Module) -> dict[str, Any]:
        """What a checkpoint holds besides the weights, optimiser and progress (e.g. the geometry
        that rebuilds the model). Plain types and tensors: checkpoints load with `weights_only`."""
        return {}

    def log_epoch(self, model: torch.nn.Module, epoch: int, first: bool, run: RunLog) -> None:
        """Rank 0, after the metrics are logged: artifacts of the epoch (e.g. pictures).

        Args:
            first: the first epoch of this launch (what is logged once per launch goes here).
        """


# -- helpers shared by the tasks -----------------------------------------------------------------------
def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP's wrapper (the model itself outside DDP)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sums over the DDP workers (in place); the identity outside DDP."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values)
    return values


def all_gather_lists(items: list) -> list:
    """Every worker's `items` (picklable), concatenated in rank order; `items` itself outside DDP."""
    if not (dist.is_available() and dist.is_initialized()):
        return items
    gathered: list[list] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, items)
    return [x for part in gathered for x in part]


# -- the loop, on every worker ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Best:
    """Early stopping's record: the epoch of the best monitored value so far, and the validations since
    that did not beat it. Every worker computes it from the same all-reduced metrics, so all stop
    together."""

    epoch: int = -1
    value: float = float("-inf")
    stale: int = 0

    def after(self, epoch: int, value: float) -> Best:
        # Better by more than float noise: a mean all-reduced over views read in another order
        # differs in its last bits, and must not count as progress.
        if value > self.value + 1e-6:
            return Best(epoch, value, 0)
        return Best(self.epoch, self.value, self.stale + 1)


def train_loop(config: dict) -> None:
    """Ray Train's entry point on each worker (Ray hands over a dict): the typed loop."""
    run_loop(config["trainer"], config["task"])


def run_loop(cfg: TrainerConfig, task: Task) -> None:
    """Trains `task` from its last checkpoint (or from scratch) to `cfg.epochs`, on this worker."""
    worker = Worker.current()
    torch.manual_seed(cfg.seed)  # every worker starts from the same weights
    model = task.build(worker)
    state = _restored_state()
    if state is not None:
        model.load_state_dict(state["model"])
    model = ray.train.torch.prepare_model(model)  # to the device, in DDP when there are several workers
    # After the move: loading the optimiser's state puts it on its parameters' device.
    optimizer = torch.optim.AdamW(param_groups(unwrap(model), cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
    start_epoch, history, best = 0, [], Best()
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history = state["epoch"] + 1, list(state.get("history", []))
        best = Best(**state.get("best", {}))
    for epoch in range(start_epoch, cfg.epochs):
        metrics = {"epoch": epoch, "start_epoch": start_epoch}
        metrics |= train_epoch(cfg, task, worker, model, optimizer, epoch)
        if cfg.validates(epoch):
            metrics |= task.end_epoch(model, epoch, worker)
            if cfg.monitor is not None:
                best = best.after(epoch, metrics[cfg.monitor])
                stop = cfg.patience is not None and best.stale >= cfg.patience
                metrics |= {"best_epoch": best.epoch, "stopped_early": float(stop)}
        history.append(metrics["train_loss"])
        _finish_epoch(cfg, task, worker, model, optimizer, metrics, history, best, first=epoch == start_epoch)
        if metrics.get("stopped_early"):
            break


def _restored_state() -> dict | None:
    """The state of the checkpoint Ray Train resumes from (restart or re-launch), None for a new run."""
    checkpoint = ray.train.get_checkpoint()
    return None if checkpoint is None else read_state(checkpoint)


def train_epoch(
    cfg: TrainerConfig,
    task: Task,
    worker: Worker,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    epoch: int,
) -> dict[str, float]:
    """One pass over this worker's batches. Returns the training loss averaged over every worker's
    samples, the last learning rate, the samples trained on (all workers': each of the epoch's samples
    once, whatever storage retries or restarts happened), and the samples per second (all workers',
    over this one's time)."""
    model.train()
    sums = torch.zeros(2, device=worker.device)  # sum of loss * samples, samples
    steps, lr, started = cfg.steps_per_epoch, cfg.lr, time.perf_counter()
    for i, batch in enumerate(task.batches(epoch, worker)):
        step = epoch * steps + i
        # Per step, not per epoch: the warm-up is usually a few epochs, the first of them steep.
        lr = lr_at(step, cfg.epochs * steps, cfg.warmup_epochs * steps, cfg.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, count = task.loss(model, batch, worker)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        task.after_step(model, step, cfg.epochs * steps)
        sums += torch.stack([loss.detach().float() * count, torch.tensor(float(count), device=worker.device)])
    sums = all_reduce_sum(sums)
    seconds = time.perf_counter() - started
    return {
        "train_loss": (sums[0] / sums[1].clamp_min(1)).item(),
        "lr": lr,
        f"train_{task.unit}": sums[1].item(),
        f"{task.unit}_per_second": sums[1].item() / seconds,
    }


def _finish_epoch(
    cfg: TrainerConfig,
    task: Task,
    worker: Worker,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    metrics: dict[str, float],
    history: list[float],
    best: Best,
    first: bool,
) -> None:
    """Rank 0 writes the checkpoint (on validation epochs) and logs the epoch; every worker reports (Ray
    Train's report is a barrier, and only rank 0's checkpoint is kept)."""
    with tempfile.TemporaryDirectory() as folder:
        saved = None
        if worker.rank == 0:
            if cfg.validates(metrics["epoch"]):
                inner = unwrap(model)
                state = {
                    "model": inner.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "epoch": metrics["epoch"],
                    "history": history,  # train loss of every epoch so far
                    "best": dataclasses.asdict(best),
                    **task.checkpoint_state(inner),
                }
                saved = _write_checkpoint(Path(folder), state, cfg.mlflow_run_id)
            print(f"epoch {metrics['epoch'] + 1}/{cfg.epochs}: " + _describe(metrics, task.unit), flush=True)
            if cfg.tracking_uri and cfg.mlflow_run_id:
                run = RunLog(cfg.tracking_uri, cfg.mlflow_run_id)
                run.metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=metrics["epoch"])
                task.log_epoch(model, metrics["epoch"], first, run)
        ray.train.report(metrics, checkpoint=saved)


def _describe(metrics: dict[str, float], unit: str) -> str:
    """'train_loss 0.1234, lr 0.001, 812 images/s, val_listmle 3.21': an epoch for the log."""
    rate = f"{unit}_per_second"
    shown = [
        f"train_loss {metrics['train_loss']:.4f}",
        f"lr {metrics['lr']:.3g}",
        f"{metrics[rate]:.0f} {unit}/s",
    ]
    skip = {"epoch", "start_epoch", "train_loss", "lr", rate, f"train_{unit}"}
    shown += [f"{k} {v:.4g}" for k, v in metrics.items() if k not in skip]
    return ", ".join(shown)


# -- checkpoints: written by rank 0, read by the loop when it resumes and by the driver -------------
def _write_checkpoint(folder: Path, state: dict, mlflow_run_id: str | None) -> ray.train.Checkpoint:
    torch.save(state, folder / STATE_FILE)
    (folder / RUN_FILE).write_text(json.dumps({"mlflow_run_id": mlflow_run_id, "epoch": state["epoch"]}))
    return ray.train.Checkpoint.from_directory(folder)


def read_state(checkpoint: ray.train.Checkpoint) -> dict:
    """A checkpoint's training state (`state.pt`), on the CPU."""
    with checkpoint.as_directory() as folder:
        return torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
