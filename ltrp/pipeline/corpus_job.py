"""The frame of every corpus job: an image corpus -> one table row per view, fanned out with Ray Data.

A corpus job (the scoring job, the ranking job) is a `CorpusJob` subclass that says only what differs:
the model it loads, what of it decides its rows (the fingerprint), its model stage and its table. The
frame does the rest, the same way for each: the up-front checks, before Ray starts (the model, the
corpus's shards, an output of another job refused); the stages (decode -> model -> commit, declared in
`ltrp.pipeline.stages` and `shards`); exactly-once shard commits and resume (`ltrp.pipeline.shards`);
the MLflow run (`run`); the summary and its printed line.

Output under OUTPUT (local path or s3://...; the layout is `ltrp.data.tables`'s):
    TABLE/part-00000.parquet ...   one row per (image, view), TABLE the job's (scores/, ranks/);
                                   a file per --file-shards shards (`_shards/`: those waiting for theirs)
    _errors/part-00000.parquet ... images that could not be used: image_id, uri, reason
    _ltrp_job.json                 the job's metadata, also in every file's Parquet key-value metadata
    _SUCCESS                       written once every shard is committed
"""

from __future__ import annotations

import importlib.metadata
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import mlflow
import pyarrow as pa
import torch

from ltrp.data.sources import SourceImage, plan_corpus, plan_digest
from ltrp.data.tables import OUTPUT_LAYOUT
from ltrp.pipeline import runtime
from ltrp.pipeline.configs import CorpusConfig, checking_inputs, identity_fields
from ltrp.pipeline.shards import FileGroups, ShardedOutput, commit_all, commit_stage, decode_stage
from ltrp.pipeline.stages import Stage, cpu_threads, model_pool, run_on_ray

C = TypeVar("C", bound=CorpusConfig)
#: How a job's stages run over its pending shards: `run_on_ray` or `stages.run_in_process`.
Runner = Callable[[list[Stage], list[dict]], Iterator[dict]]


@dataclass(frozen=True)
class CorpusSummary:
    """What one launch of a corpus job did."""

    verb: str  # what the job did to each image: "scored", "ranked"
    output: str
    shards: int
    shards_skipped: int  # finished by an earlier run
    images: int  # images given rows by this run
    rows_written: int
    errors: int
    seconds: float
    passed_over: dict[str, int]  # files of the source that are neither images nor tar shards, by suffix

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def metrics(self) -> dict[str, float]:
        """The summary as MLflow metrics."""
        return {
            "images": self.images,
            "rows_written": self.rows_written,
            "shards_skipped": self.shards_skipped,
            "errors": self.errors,
            "files_passed_over": sum(self.passed_over.values()),
            "wall_seconds": self.seconds,
            "images_per_second": self.images_per_second,
        }

    def describe(self) -> str:
        """The line a launcher prints."""
        from ltrp.data.sources import describe_passed_over

        return (
            f"{self.verb} {self.images} images ({self.rows_written} rows) and skipped {self.shards_skipped} "
            f"finished shards of {self.shards}; {self.errors} errors; {self.seconds:.1f} s, "
            f"{self.images_per_second:.2f} img/s -> {self.output}"
            + (f"; {describe_passed_over(self.passed_over)}" if self.passed_over else "")
        )


class CorpusJob(ABC, Generic[C]):
    """A corpus job, checked and planned: building one loads its model (refusing a missing or wrong
    one), plans the corpus's shards (refusing a source without images) and checks that the output
    holds nothing of another job, before any worker starts or anything is written.

    Subclasses set `name` (its MLflow experiment is ltrp-NAME), `verb`, `table` and `schema` (the
    output's rows), `columns` (what the decode stage adds to each row besides the view and its pixels)
    and implement the abstract methods.
    """

    name: ClassVar[str]
    verb: ClassVar[str]
    table: ClassVar[str]
    schema: ClassVar[pa.Schema]
    columns: ClassVar[tuple[pa.Field, ...]] = ()

    def __init__(self, cfg: C) -> None:
        self.cfg = cfg
        with checking_inputs():
            self.model = self.load()
            self.corpus = plan_corpus(cfg.source, cfg.shard_size)
            fingerprint = {
                **identity_fields(cfg),
                "plan_digest": plan_digest(self.corpus.shards),
                "layout": OUTPUT_LAYOUT,
                **self.model_keys(),
            }
            self.metadata = {
                **fingerprint,
                "fingerprint": sorted(fingerprint),
                **self.details(),
                "ltrp_version": importlib.metadata.version("ltrp"),
                "torch_version": str(torch.__version__),  # a plain str: a TorchVersion would unpickle torch
            }
            groups = FileGroups(cfg.file_shards, len(self.corpus.shards))
            self.out = ShardedOutput(cfg.output, self.table, self.schema, groups)
            self.out.check(self.metadata)

    @abstractmethod
    def load(self) -> Any:
        """The job's model, loaded and checked (the up-front checks turn an OSError or ValueError
        into an `InputError` naming the input)."""

    @abstractmethod
    def model_keys(self) -> dict[str, Any]:
        """What of the model decides the rows (its weights' digest, its geometry): fingerprint keys."""

    def details(self) -> dict[str, Any]:
        """Metadata beyond the fingerprint: where the model came from, its format."""
        return {}

    def tags(self) -> dict[str, str]:
        """The MLflow run's tags naming the model."""
        return {}

    @property
    @abstractmethod
    def size(self) -> int:
        """The side of a view, in pixels: the model's input."""

    @abstractmethod
    def image_rows(self) -> Callable[[SourceImage], list[dict]]:
        """The decode stage's rows of one image (a picklable function: it travels to the workers)."""

    @abstractmethod
    def model_stage(self, gpu: bool) -> Stage:
        """The stage that turns rows with pixels into the table's rows."""

    def rows_per_image(self) -> int:
        """Rows the table holds per image."""
        return self.cfg.views

    def actor_resources(self, gpu: bool) -> dict[str, Any]:
        """What each actor of the model stage reserves, and their pool, from the config's workers."""
        cfg = self.cfg
        return {
            "cpus": cfg.worker_cpus,
            "gpus": 1 if gpu else 0,
            "pool": model_pool(cfg.workers, cfg.max_workers, runtime.cluster_gpus() if gpu else 0),
            "threads": cpu_threads(gpu, cfg.worker_cpus, cfg.threads),
        }

    def stages(self, lease_token: str, gpu: bool) -> list[Stage]:
        """decode -> model -> commit, for a run holding the output's lease `lease_token`."""
        shard_rows = self.cfg.shard_size * self.rows_per_image()
        decode = decode_stage(self.image_rows(), self.columns, shard_rows * self.size * self.size * 3)
        return [decode, self.model_stage(gpu), commit_stage(self.out, self.metadata, lease_token, shard_rows)]

    def write(self, runner: Runner = run_on_ray, progress: Callable[[str], None] = print) -> CorpusSummary:
        """Claims the output and has the stages write the shards it does not hold yet (on the Ray
        cluster this process is connected to, a local one started if none is; or as `runner` runs
        them), without MLflow."""
        start = time.perf_counter()
        gpu = runtime.use_gpu(self.cfg.device)

        def manifests(pending: list, lease_token: str) -> Iterator[dict]:
            return runner(self.stages(lease_token, gpu), [{"shard": s.to_json()} for s in pending])

        lease_holder = f"jobs.{self.name}"
        skipped, written = commit_all(
            self.out, lease_holder, self.metadata, self.corpus.shards, manifests, progress
        )
        return CorpusSummary(
            self.verb,
            self.cfg.output,
            len(self.corpus.shards),
            skipped,
            written.images,
            written.rows,
            written.errors,
            time.perf_counter() - start,
            self.corpus.passed_over,
        )


def run(job_type: type[CorpusJob[C]], cfg: C, progress: Callable[[str], None] = print) -> CorpusSummary:
    """A corpus job as launchers run it: checked and planned, then written on Ray inside an MLflow run
    (experiment ltrp-NAME) with the settings as params, the model as tags and the summary as metrics."""
    runtime.track()  # the registry a job may load its model from
    job = job_type(cfg)
    runtime.start(f"ltrp-{job.name}")
    with mlflow.start_run(run_name=f"{job.name} {Path(cfg.source.rstrip('/')).name}"):
        mlflow.log_params(asdict(cfg))
        mlflow.set_tags(job.tags())
        summary = job.write(progress=progress)
        mlflow.log_metrics(summary.metrics())
        mlflow.set_tag("output_uri", summary.output)
    return summary
