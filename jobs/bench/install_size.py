"""Benchmark: the installed size of each lock file's packages, the workers' image against the head's.

    python -m jobs.bench.install_size      # in the Makefile's .venv, which installs requirements/dev.lock

The cluster images install requirements/head.lock (job drivers) or requirements/worker.lock (the
stages only). Per lock: its packages and the bytes they occupy installed, summed from each
distribution's RECORD in this environment (the dev lock's, which holds every package of the other two
at the same version). Then what the head adds over the workers, largest first. The base image's own
files (Ray's CUDA image) come on top of either.
"""

from __future__ import annotations

import importlib.metadata
import re
from dataclasses import dataclass
from pathlib import Path

import tyro
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
LOCKS = ("worker", "head", "dev")
MB = 1e6


@dataclass
class InstallSizeConfig:
    """Installed size of each lock's packages, measured in this environment."""

    largest: int = 10  # the head's packages beyond the workers' listed, largest first


def locked_packages(name: str) -> list[str]:
    """The packages requirements/NAME.lock pins, in canonical form."""
    text = (ROOT / "requirements" / f"{name}.lock").read_text()
    return [canonicalize_name(m) for m in re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==", text, re.M)]


def installed_bytes(package: str) -> int:
    """Bytes of the files `package` installed here (its RECORD's sizes; 0 where one gives none)."""
    files = importlib.metadata.distribution(package).files or []
    return sum(f.size or 0 for f in files)


def main(argv: list[str] | None = None) -> dict:
    prog = "python -m jobs.bench.install_size"
    cfg = tyro.cli(InstallSizeConfig, args=argv, prog=prog, description=__doc__)
    sizes = {name: {p: installed_bytes(p) for p in locked_packages(name)} for name in LOCKS}
    print("| lock | packages | installed (MB) |\n|---|---|---|")
    for name, packages in sizes.items():
        print(f"| {name} | {len(packages)} | {sum(packages.values()) / MB:,.0f} |")
    extra = {p: b for p, b in sizes["head"].items() if p not in sizes["worker"]}
    head, worker = sum(sizes["head"].values()), sum(sizes["worker"].values())
    print(f"\nthe head's image adds {len(extra)} packages, {(head - worker) / MB:,.0f} MB "
          f"({head / worker:.3f}x the workers'); largest:")  # fmt: skip
    for package, size in sorted(extra.items(), key=lambda kv: -kv[1])[: cfg.largest]:
        print(f"  {package:24s} {size / MB:8.1f} MB")
    return {name: sum(packages.values()) for name, packages in sizes.items()}


if __name__ == "__main__":
    main()
