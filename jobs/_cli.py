"""Shared by the launchers: a dataclass's fields as flags, with an optional YAML file of defaults."""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import fields
from pathlib import Path

import yaml

_TYPES = {"int": int, "float": float, "int | None": int, "float | None": float}
# Fields that take several values: `--keep-ratios 0.1 0.25` (a YAML list in --config).
_LISTS = {"tuple[float, ...]": float, "tuple[str, ...]": str, "tuple[str, ...] | None": str}


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, help: dict[str, str]) -> None:
    """One `--flag-name` per field (booleans as --x / --no-x); every default None, so that flags
    given override the YAML file and the dataclass's own defaults fill the rest."""
    parser.add_argument(
        "--config",
        help="YAML file of defaults: the options below (with underscores) at the top level or under "
        "this job's section, as in jobs/pipeline.yaml",
    )
    for field in fields(cls):
        flag = "--" + field.name.replace("_", "-")
        if field.type == "bool":
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=help[field.name]
            )
        elif field.type in _LISTS:
            parser.add_argument(flag, type=_LISTS[field.type], nargs="+", default=None, help=help[field.name])
        else:
            parser.add_argument(flag, type=_TYPES.get(field.type, str), default=None, help=help[field.name])


def merged_values(args: argparse.Namespace, names: list[str], section: str) -> dict:
    """Values for the fields in `names`: the YAML file's top-level keys, then its `section` (the
    pipeline file has one per job: pretrain, score, train, evaluate), then the flags given."""
    given = vars(args)
    values = yaml.safe_load(Path(given["config"]).read_text()) if given.get("config") else {}
    values = {**values, **(values.get(section) or {})}
    values.update({k: v for k, v in given.items() if v is not None and k in names})
    return {k: v for k, v in values.items() if k in names}


def parse_job_values(
    cls: type,
    help: dict[str, str],
    section: str,
    description: str,
    argv: list[str] | None,
    required: tuple[str, ...] = (),
) -> tuple[argparse.ArgumentParser, dict]:
    """A launcher's command line: one flag per field of `cls`, `--config` YAML (top level, then
    `section`), flags winning; exits with a usage error naming any `required` field left unset.
    Returns the parser (for further checks) and the values given."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_dataclass_flags(parser, cls, help)
    values = merged_values(parser.parse_args(argv), [f.name for f in fields(cls)], section)
    missing = [name for name in required if name not in values]
    if missing:
        parser.error("missing: " + ", ".join("--" + m.replace("_", "-") for m in missing))
    return parser, values


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, default a SQLite file here; a relative SQLite path is made absolute,
    because Ray workers, which log too, run in other working directories."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        uri = prefix + os.path.abspath(uri[len(prefix) :])
    return uri


def local_resources(workers: int, worker_cpus: float) -> dict:
    """For a Ray started here (no RAY_ADDRESS): enough logical CPUs that the data-loading tasks still
    run beside the train workers. Reserving every core for workers deadlocks small machines (2 cores,
    2 workers: reading the score table waited forever)."""
    if os.environ.get("RAY_ADDRESS"):
        return {}
    return {"num_cpus": max(os.cpu_count() or 1, math.ceil(workers * worker_cpus) + 2)}
