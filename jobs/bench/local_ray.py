"""The benchmarks' Ray: a cluster of `ray start` nodes on this machine, which a driver here joins."""

from __future__ import annotations

import time

import ray

import ltrp
from ltrp import local


class LocalCluster(local.RayCluster):
    """`nodes` Ray nodes on 127.0.0.1 (`ltrp.local.RayCluster`: a head and nodes - 1 workers, each
    a process group with a temp dir of its own, stopped by killing those groups), token authentication
    off, each node with `cpus` logical CPUs."""

    def __init__(
        self, nodes: int, cpus: int, temp_prefix: str = "ltrp-hr-", object_store_bytes: int = 200_000_000
    ) -> None:
        super().__init__(
            nodes - 1,
            head_cpus=cpus,
            worker_cpus=cpus,
            env=local.ray_node_env(),
            temp_prefix=temp_prefix,
            object_store_bytes=object_store_bytes,
        )
        self.address = self.gcs_address

    def wait_for_nodes(self, count: int, cpus: int, timeout: float = 120) -> None:
        """Until this (connected) driver sees `count` alive nodes and all their CPUs."""
        deadline = time.monotonic() + timeout
        while True:
            alive = [n for n in ray.nodes() if n["Alive"]]
            if len(alive) == count and ray.cluster_resources().get("CPU", 0) == count * cpus:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(alive)} of {count} Ray nodes alive after {timeout} s")
            time.sleep(0.5)


@ray.remote(num_cpus=0)
def _worker_ltrp() -> str:
    return ltrp.__file__


def check_same_code() -> None:
    """A worker must import the same `ltrp` as this driver: the editable install points at one
    checkout, and a run from another (a worktree of an older commit) must not be scored by that one's
    code. (Ray puts the driver's working directory first on its workers' path: run from the root.)"""
    theirs = ray.get(_worker_ltrp.remote())
    if theirs != ltrp.__file__:
        raise RuntimeError(f"Ray workers import {theirs}, this driver {ltrp.__file__}: run from the checkout")
