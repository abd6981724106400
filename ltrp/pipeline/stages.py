"""A corpus job's stages, declared once and run on Ray Data or in this process (NeMo-Curator's pattern).

A `Stage` says what runs (a function, or a class whose instances are called on batches: a pool of
actors that each load a model once), on what batches and with what each worker reserves. `wire` is
the only place that turns stages into Ray Data operators; `run_in_process` calls the same stages as
plain functions, for tests and for tables too small to be worth starting workers.

Worker-side: this module and the stage functions it is given import neither MLflow nor the jobs, so a
decode or model worker pays for neither (tests/pipeline/test_stages.py checks it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:
    import ray


@dataclass(frozen=True)
class Pool:
    """Actors of a model stage: at least `size`, grown up to `max_size` by an autoscaling cluster."""

    size: int
    max_size: int


@dataclass(frozen=True)
class Stage:
    """One step of a corpus job.

    Args:
        fn: a function of a batch, or a class: its instances (one per actor of `pool`) are called on batches.
        batch_size: rows per call.
        batch_format: what `fn` takes: "numpy" (a dict of arrays) or "pyarrow" (a table); it returns a table.
        kwargs: `fn`'s keyword arguments (a class's: its constructor's).
        cpus: CPUs each task or actor reserves.
        gpus: GPUs each actor reserves.
        memory: bytes each task reserves (None: Ray's default).
        pool: a class's actor pool (required for a class, None for a function: tasks).
        threads: torch threads of a CPU actor, set as OMP_NUM_THREADS when it starts (torch.set_num_threads
            later ran slower: 0.27-0.33 img/s against 0.61 scoring on 2 cores).
    """

    fn: Callable[..., pa.Table]
    batch_size: int
    batch_format: Literal["numpy", "pyarrow"] = "pyarrow"
    kwargs: dict[str, Any] = field(default_factory=dict)
    cpus: float = 1.0
    gpus: float = 0
    memory: int | None = None
    pool: Pool | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.fn, type) != (self.pool is not None):
            raise ValueError(f"stage {self.name}: a class runs in an actor pool, a function as tasks")

    @property
    def name(self) -> str:
        return getattr(self.fn, "__name__", repr(self.fn))


def model_pool(workers: int | None, max_workers: int | None, gpus: int) -> Pool:
    """A model stage's pool: `workers` (None: one per GPU of the cluster, or 1 without GPUs), which an
    autoscaling cluster may grow up to `max_workers` (never below the pool's size)."""
    size = workers or max(1, gpus)
    return Pool(size, max(size, max_workers or size))


def cpu_threads(gpu: bool, cpus: float, threads: int | None) -> int | None:
    """A CPU model actor's torch threads: `threads`, else the CPUs it reserves (not the cores of the
    machine that submits the job, which may be a laptop beside a cluster); None on a GPU."""
    return None if gpu else threads or max(1, math.ceil(cpus))


def wire(ds: ray.data.Dataset, stages: Iterable[Stage]) -> ray.data.Dataset:
    """`ds` through each stage, as Ray Data operators: tasks for functions, actor pools for classes."""
    import ray.data

    for stage in stages:
        options: dict[str, Any] = {"num_cpus": stage.cpus, "num_gpus": stage.gpus}
        if stage.memory is not None:
            options["memory"] = stage.memory
        if stage.threads is not None:
            options["runtime_env"] = {"env_vars": {"OMP_NUM_THREADS": str(stage.threads)}}
        if stage.pool is None:
            options["fn_kwargs"] = stage.kwargs
        else:
            options["fn_constructor_kwargs"] = stage.kwargs
            options["compute"] = ray.data.ActorPoolStrategy(
                min_size=stage.pool.size, max_size=stage.pool.max_size
            )
        ds = ds.map_batches(stage.fn, batch_size=stage.batch_size, batch_format=stage.batch_format, **options)
    return ds


def dataset(stages: list[Stage], items: list[dict]) -> ray.data.Dataset:
    """The items (one block each) through the stages, as a Ray Data dataset (lazy: nothing runs yet)."""
    import ray.data

    return wire(ray.data.from_items(items, override_num_blocks=len(items)), stages)


def run_on_ray(stages: list[Stage], items: list[dict]) -> Iterator[dict]:
    """The rows the last stage returns, the items run through the stages by Ray Data."""
    return dataset(stages, items).iter_rows()


def run_in_process(stages: list[Stage], items: list[dict]) -> Iterator[dict]:
    """The rows the last stage returns, each item run through every stage in this process (a class's
    instance built once): what `run_on_ray` gives, without workers."""
    instances = {id(s): s.fn(**s.kwargs) for s in stages if s.pool is not None}
    for item in items:
        batch = pa.Table.from_pylist([item])
        for stage in stages:
            fn = instances.get(id(stage)) or (lambda b, s=stage: s.fn(b, **s.kwargs))
            batch = fn(_as_format(batch, stage.batch_format))
        yield from batch.to_pylist()


def _as_format(
    table: pa.Table, batch_format: Literal["numpy", "pyarrow"]
) -> pa.Table | dict[str, np.ndarray]:
    if batch_format == "pyarrow":
        return table
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
