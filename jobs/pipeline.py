"""The whole pipeline, one command: scenes with known object masks -> the shipped MAE (or pre-train one)
-> score -> train the ranker -> evaluate it against the baselines -> register and promote -> a summary.

    python -m jobs.pipeline                   # jobs/pipeline.yaml: local Ray, runs/pipeline, SQLite MLflow
    python -m jobs.pipeline --config my.yaml  # another size or registered model (jobs/benchmark.yaml)

Each step is the job you would run by hand (python -m jobs.pretrain_mae, jobs.score, jobs.train,
jobs.evaluate, jobs.promote) with the config file's section for it and the paths derived from `root`.
A step whose settings are unchanged and whose outputs exist is not run again.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import tyro

from ltrp.pipeline.configs import ConfigError

DEFAULT_CONFIG = Path(__file__).with_name("pipeline.yaml")


@dataclass
class PipelineArgs:
    """The whole LTRP pipeline (scenes by default), steps reused when their settings are unchanged."""

    config: Path = DEFAULT_CONFIG  # root, seed and one section per step


def main(argv: list[str] | None = None) -> dict:
    args = tyro.cli(PipelineArgs, args=argv, prog="python -m jobs.pipeline", description=__doc__)
    from ltrp.pipeline import workflow  # after parsing: --help needs no torch, Ray or MLflow

    try:
        pipeline = workflow.Pipeline(args.config)  # every step's config, checked before anything runs
    except ConfigError as err:
        print(f"python -m jobs.pipeline: error: {err}", file=sys.stderr)
        sys.exit(2)
    start = time.perf_counter()
    results = workflow.run(pipeline)
    print(workflow.summary(results, time.perf_counter() - start))
    return results


if __name__ == "__main__":
    main()
