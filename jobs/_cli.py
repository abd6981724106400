"""The launchers' command line: a job config's fields as typed flags (tyro), with a YAML file of defaults."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import MISSING, fields
from typing import NoReturn, TypeVar

import tyro

from ltrp.pipeline.configs import ConfigError, InputError, read_config_file

T = TypeVar("T")
S = TypeVar("S")


def parse(cls: type[T], section: str, argv: list[str] | None, prog: str, defaults: dict | None = None) -> T:
    """A job's config from its command line: `--config FILE` (the file's top-level keys this job knows,
    then its `section`), then the flags, which win. Every value is checked by the config itself; a bad
    one, an unknown key in the file, or a missing required option exits with code 2 and a message
    naming it, before anything is started or written.

    Args:
        cls: the job's config dataclass (`ltrp.pipeline.configs`).
        section: the job's section in a config file, e.g. "score".
        argv: the arguments (None: sys.argv[1:]).
        prog: how the user runs the job, for usage and error messages.
        defaults: values that replace the config's own defaults (a file and the flags still win).
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    given, rest = pre.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        from_file = read_config_file(given.config, section) if given.config else {}
    except ConfigError as err:  # it names the file and the key
        refuse(prog, str(err))
    try:
        required = {f.name: tyro.MISSING for f in fields(cls) if f.default is MISSING}
        default = cls(**{**required, **(defaults or {}), **from_file})
    except ConfigError as err:
        refuse(prog, f"{err} (from --config {given.config})" if given.config else str(err))
    description = (
        f"{cls.__doc__}\n\nEvery option can also come from --config FILE.yaml: its top-level keys that are "
        f"options of this job, then its '{section}' section (as in jobs/pipeline.yaml); flags win."
    )
    return tyro.cli(cls, args=rest, default=default, prog=prog, description=description)


def refuse(prog: str, message: str) -> NoReturn:
    """A usage error: the message on stderr, exit code 2."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(2)


def run_job(run: Callable[[T], S], cfg: T, prog: str) -> S:
    """`run(cfg)`, with an input its up-front checks refuse reported as a usage error (exit 2)."""
    try:
        return run(cfg)
    except InputError as err:
        refuse(prog, str(err))
