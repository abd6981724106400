"""The driver's side of every training job (MAE pre-training, ranker training), in the job's own
process: it holds the training's name (`claimed`), starts Ray Train's workers on the loop of
`ltrp.pipeline.training_loop` (`fit`), and reads back what they reported (`best_checkpoint`).

A launch resumes the training found under STORAGE/NAME: Ray Train resumes from the checkpoint it last
recorded, and a training that already finished starts no workers. Before a launch, the driver reads the
MLflow run from the checkpoint Ray Train will resume from (`resumed_run_id`) and reopens it
(`mlflow_run`): one training, one MLflow run, across restarts and re-launches.
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import fsspec
import mlflow
import pyarrow.fs
import ray
import ray.train
import ray.train.torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from ltrp.data import tables
from ltrp.pipeline import runtime
from ltrp.pipeline.configs import InputError, PretrainConfig, TrainConfig
from ltrp.pipeline.lease import Lease
from ltrp.pipeline.training_loop import RUN_FILE, Task, TrainerConfig, train_loop


def absolute_uri(uri: str) -> str:
    """A URL, or an absolute local path: as Ray Train wants its storage, and as lineage is recorded (a
    relative path means nothing to whoever reads a tag or a table written elsewhere)."""
    return uri if "://" in uri else os.path.abspath(uri)


INPUTS_FILE = "_ltrp_inputs.json"


@contextmanager
def claimed(storage: str, name: str, job: str, inputs: dict[str, Any]) -> Iterator[Lease]:
    """Holds the training STORAGE/NAME for `job` (its lease: one launch at a time) and checks that
    the name stands for one training: the first launch records there what it learns from, and a launch
    of that name on other inputs is refused before any work, since it would resume (or register) the
    other training's weights. Yields the lease, for `Lease.check` before a result is published.

    Raises:
        LeaseHeld: another launch holds the name.
        InputError: naming --storage and --name and the inputs that differ.
    """
    folder = posixpath.join(absolute_uri(storage), name)
    inputs = json.loads(json.dumps(inputs))  # as the record reads back: a tuple option becomes a list
    with Lease(folder, job) as lease:
        fs, root = fsspec.core.url_to_fs(folder)
        path = posixpath.join(root, INPUTS_FILE)
        if not fs.exists(path):
            fs.pipe_file(path, json.dumps(inputs, indent=2).encode())
        else:
            earlier = json.loads(fs.cat_file(path))
            differs = sorted(k for k in earlier.keys() | inputs.keys() if earlier.get(k) != inputs.get(k))
            if differs:
                raise InputError(
                    f"--storage {storage} --name {name} holds a training of other inputs (differs in: "
                    f"{', '.join(differs)}; it learned from {earlier}); resuming needs the same: use "
                    "another --name"
                )
        yield lease


def settings(
    cfg: PretrainConfig | TrainConfig,
    *,
    steps_per_epoch: int,
    lr: float,
    tracking_uri: str | None = None,
    mlflow_run_id: str | None = None,
    monitor: str | None = None,
) -> TrainerConfig:
    """A job's trainer settings: the fields both job configs share, `--device` resolved against the Ray
    cluster this process is connected to (so call it after `runtime.start`). A job with
    `validate_every` and `patience` options (ranker training) passes the metric they watch as
    `monitor`."""
    return TrainerConfig(
        name=cfg.name,
        storage=cfg.storage,
        workers=cfg.workers,
        worker_cpus=cfg.worker_cpus,
        use_gpu=runtime.use_gpu(cfg.device),
        max_failures=cfg.max_failures,
        keep_checkpoints=cfg.keep_checkpoints,
        epochs=cfg.epochs,
        warmup_epochs=cfg.warmup_epochs,
        steps_per_epoch=steps_per_epoch,
        lr=lr,
        weight_decay=cfg.weight_decay,
        seed=cfg.seed,
        tracking_uri=tracking_uri,
        mlflow_run_id=mlflow_run_id,
        validate_every=getattr(cfg, "validate_every", 1),
        monitor=monitor,
        patience=getattr(cfg, "patience", None),
    )


def fit(cfg: TrainerConfig, task: Task, datasets: dict[str, ray.data.Dataset]) -> ray.train.Result:
    """Runs the loop on Ray Train (DDP) with `cfg`'s workers, checkpoints in STORAGE/NAME (resuming the
    run found there) and restarts; returns the result (last checkpoint and its metrics).

    A training that already reached `cfg.epochs` (a finished run launched again) starts no workers:
    its last result comes back as is, with `start_epoch` = `cfg.epochs` to say that nothing was run.

    Args:
        datasets: split across the workers; a task takes its shard with `ray.train.get_dataset_shard`.
    """
    finished = finished_result(cfg)
    if finished is not None:
        return finished
    storage_filesystem, storage_path = tables.arrow_filesystem(cfg.storage)
    trainer = ray.train.torch.TorchTrainer(
        train_loop,
        train_loop_config={"trainer": cfg, "task": task},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.workers, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": cfg.worker_cpus}
        ),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            # Ray Train keeps the latest checkpoint too (what a relaunch resumes from); the best one
            # by the monitored metric is the one registered.
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.keep_checkpoints,
                checkpoint_score_attribute=cfg.monitor,
                checkpoint_score_order="max",
            ),
        ),
        datasets=datasets,
    )
    return trainer.fit()


def best_checkpoint(result: ray.train.Result) -> tuple[ray.train.Checkpoint, dict]:
    """The checkpoint of the epoch with the best monitored value so far (`best_epoch` of the last
    metrics; the last checkpoint when nothing is monitored), and its metrics."""
    epoch = result.metrics.get("best_epoch", result.metrics["epoch"])
    for checkpoint, metrics in result.best_checkpoints:
        if metrics["epoch"] == epoch:
            return checkpoint, metrics
    raise RuntimeError(f"{result.path} holds no checkpoint of epoch {epoch}, its best")


def latest_result(storage: str, name: str) -> ray.train.Result | None:
    """The last result of the training named `name` in `storage`, whose checkpoint a launch resumes
    from; None for a new training. Read from Ray Train's own record of the run, not guessed from the
    folders: the newest folder may be one still uploading when the last launch stopped, which Ray Train
    does not resume from."""
    fs, root = tables.arrow_filesystem(posixpath.join(storage, name))
    try:
        return ray.train.Result.from_path(root, storage_filesystem=fs)
    except RuntimeError:  # Ray Train's answer when no run, or no checkpoint of one, is recorded there
        return None


def latest_checkpoint(storage: str, name: str) -> ray.train.Checkpoint | None:
    """The checkpoint that a launch named `name` in `storage` resumes from, None for a new run."""
    result = latest_result(storage, name)
    return None if result is None else result.checkpoint


def finished_result(cfg: TrainerConfig) -> ray.train.Result | None:
    """The result of a training in STORAGE/NAME that already reached `cfg.epochs` or stopped early,
    None otherwise."""
    result = latest_result(cfg.storage, cfg.name)
    if result is None or result.checkpoint is None:
        return None
    if result.metrics["epoch"] + 1 < cfg.epochs and not result.metrics.get("stopped_early"):
        return None
    return dataclasses.replace(result, metrics={**result.metrics, "start_epoch": cfg.epochs})


def resumed_run_id(storage: str, name: str) -> str | None:
    """The MLflow run of the training in STORAGE/NAME, as its resume checkpoint records it; None for a
    new training (or checkpoints written before runs were recorded)."""
    checkpoint = latest_checkpoint(storage, name)
    if checkpoint is None:
        return None
    path = posixpath.join(checkpoint.path, RUN_FILE)
    if checkpoint.filesystem.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
        return None
    with checkpoint.filesystem.open_input_stream(path) as f:
        return json.loads(f.read()).get("mlflow_run_id")


@contextmanager
def mlflow_run(
    experiment: str, run_name: str, resume: str | None, params: dict[str, Any], tags: dict[str, str]
) -> Iterator[mlflow.ActiveRun]:
    """The training's MLflow run, active inside the block: the run `resume` names (from
    `resumed_run_id`) if it can be reopened here, else a new one in `experiment`.

    MLflow params cannot change, so a reopened run keeps its first launch's values; a re-launch's new
    options are logged as params, and its changed ones as tags `relaunched_with.NAME`.
    """
    run_id = resume if resume and _reopenable(resume, experiment) else None
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name) as run:
        logged = run.data.params
        mlflow.log_params({k: v for k, v in params.items() if k not in logged})
        changed = {k: v for k, v in params.items() if k in logged and logged[k] != str(v)}
        mlflow.set_tags({**tags, **{f"relaunched_with.{k}": str(v) for k, v in changed.items()}})
        yield run


def _reopenable(run_id: str, experiment: str) -> bool:
    """Whether the run is on this tracking server, in `experiment`, and not deleted. A checkpoint may
    outlive its run, or be resumed against another server: then the training logs to a new run."""
    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException as err:
        problem = f"not found ({err.error_code})"
    else:
        current = mlflow.get_experiment_by_name(experiment)
        if run.info.lifecycle_stage != "active":
            problem = "deleted"
        elif current is None or run.info.experiment_id != current.experiment_id:
            problem = f"in another experiment than {experiment}"
        else:
            return True
    print(
        f"note: the checkpoints' MLflow run {run_id} is {problem} on {mlflow.get_tracking_uri()}; "
        "logging to a new run",
        file=sys.stderr,
    )
    return False
