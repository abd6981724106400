"""Local stand-ins for a cluster's services, for tests and benchmarks alike: a moto S3 server, an MLflow
tracking server with a SQLite registry, and a multi-node Ray cluster of `ray start` processes, all on
127.0.0.1 at free ports, each started as a subprocess and stopped by its process id (or group), never by
name: other servers and other Rays may run on the same machine.

Importing this module loads no torch, Ray or MLflow: the servers are this environment's console scripts.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

#: This environment's console scripts (moto_server, mlflow, ray): a Ray node started from here then runs
#: this environment's Python.
BIN = Path(sys.executable).parent

#: The ports a Ray node otherwise takes at fixed defaults, which another Ray on this machine may hold.
_NODE_PORTS = (
    "node-manager-port",
    "object-manager-port",
    "runtime-env-agent-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "metrics-export-port",
)


def free_port() -> int:
    """Returns a TCP port free on 127.0.0.1 at the time of the call."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Waits until something listens on 127.0.0.1:`port`.

    Args:
        port: The port the server was told to listen on.
        proc: The server's process: its early exit fails the wait at once rather than at the timeout.
        timeout: Seconds to wait at most.

    Raises:
        RuntimeError: The process exited first.
        TimeoutError: Nothing listened within `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early with code {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


@dataclass(frozen=True)
class Server:
    """A server process listening on 127.0.0.1:`port`."""

    proc: subprocess.Popen
    port: int

    @property
    def url(self) -> str:
        """http://127.0.0.1:PORT."""
        return f"http://127.0.0.1:{self.port}"


def start_moto_server(timeout: float = 30.0) -> Server:
    """Starts a moto S3 server on 127.0.0.1 at a free port and waits until it listens.

    Args:
        timeout: Seconds to wait for it to listen (it is stopped if it does not).

    Returns:
        The server; its `url` is the S3 endpoint. Stop it with `stop_moto_server`.
    """
    port = free_port()
    proc = subprocess.Popen(
        [BIN / "moto_server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = Server(proc, port)
    _wait_or_stop(server, timeout, stop_moto_server)
    return server


def stop_moto_server(server: Server) -> None:
    """Stops a moto server by its process id (SIGTERM) and waits for it to exit."""
    server.proc.terminate()
    server.proc.wait(timeout=10)


def start_mlflow_server(root: Path, timeout: float = 120.0) -> Server:
    """Starts an MLflow tracking server with a SQLite registry on 127.0.0.1 at a free port.

    Args:
        root: Folder of its database (mlflow.db) and its artifacts (artifacts/).
        timeout: Seconds to wait for it to listen (it is stopped if it does not); ~5 s alone, over 60 s
            on 2 cores beside a DDP training (a test-faults run timed out at 60).

    Returns:
        The server; its `url` is the tracking URI. Stop it with `stop_mlflow_server`.
    """
    port = free_port()
    # No job execution (on by default with a database store): its job runners are processes a stand-in
    # registry does not need.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [
            BIN / "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{root}/mlflow.db",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",  # one app server process, not gunicorn's 4: the machines here have 2 cores
            "1",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        # A group of its own: `mlflow server` runs its app server as child processes, stopped with it.
        start_new_session=True,
    )
    server = Server(proc, port)
    _wait_or_stop(server, timeout, stop_mlflow_server)
    return server


def stop_mlflow_server(server: Server) -> None:
    """Stops an MLflow server by its process group (SIGTERM) and waits for it to exit."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.proc.pid, signal.SIGTERM)
    server.proc.wait(timeout=20)


def _wait_or_stop(server: Server, timeout: float, stop: Callable[[Server], None]) -> None:
    """Waits for `server` to listen; stops it if it does not, so that a failed start leaves nothing."""
    try:
        wait_for_port(server.port, server.proc, timeout=timeout)
    except BaseException:
        with contextlib.suppress(Exception):
            stop(server)
        raise


@contextlib.contextmanager
def moto_server() -> Iterator[Server]:
    """A moto S3 server for the duration of the block (`start_moto_server`, `stop_moto_server`)."""
    server = start_moto_server()
    try:
        yield server
    finally:
        stop_moto_server(server)


@contextlib.contextmanager
def mlflow_server(root: Path) -> Iterator[Server]:
    """An MLflow server for the duration of the block (`start_mlflow_server`, `stop_mlflow_server`)."""
    server = start_mlflow_server(root)
    try:
        yield server
    finally:
        stop_mlflow_server(server)


def ray_node_env(token: str | None = None, drop: Collection[str] = ()) -> dict[str, str]:
    """The environment of a local Ray node: this process's, without its Ray settings.

    Args:
        token: The cluster's authentication token: token authentication on with it, or off when None.
        drop: Further variables the nodes must not have (a test's settings that only a job's runtime
            env may bring, as on a real cluster).

    Returns:
        The environment, with this environment's console scripts first on PATH (`python` in a job's
        entrypoint is this environment's) and usage stats off.
    """
    # No RAY_*: a RAY_ADDRESS would make a head join another cluster.
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("RAY_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    if token is None:
        # Off, said explicitly: unset, `ray start` turns it on whenever a ~/.ray/auth_token exists (a
        # local `ray.init()` writes one), and a driver given an address stays off and is refused. (On,
        # a driver needs the token in its environment before Ray is first imported: Ray reads its auth
        # mode once.)
        env["RAY_AUTH_MODE"] = "disabled"
    else:
        env["RAY_AUTH_MODE"] = "token"
        env["RAY_AUTH_TOKEN"] = token
    return env


@dataclass(frozen=True)
class RayNode:
    """One `ray start --block` process (the leader of its process group) and the node's temp dir."""

    proc: subprocess.Popen
    temp_dir: str


def port_flags(*names: str) -> list[str]:
    """`--NAME=PORT` flags, each at a free port, for ports a node would otherwise take at fixed
    defaults (other Rays may run on this machine)."""
    return [f"--{name}={free_port()}" for name in names]


def start_ray_node(
    args: Sequence[str],
    cpus: int,
    env: Mapping[str, str],
    temp_prefix: str,
    object_store_bytes: int = 200_000_000,
) -> RayNode:
    """Starts one Ray node on 127.0.0.1 with ports of its own, without waiting for it.

    Args:
        args: Its role's flags: `--head --port=...` or `--address=HOST:PORT`, and any more.
        cpus: Its logical CPUs.
        env: Its environment (`ray_node_env`).
        temp_prefix: Prefix of its temp dir under /tmp.
        object_store_bytes: Its object store's size (small for tests; a job whose blocks do not fit
            spills them to disk).

    Returns:
        The node. Stop it with `kill_ray_nodes`.
    """
    # A temp dir of its own, as on separate machines: nodes that share one unpack a job's working dir
    # into the same folder and delete it under each other. Short paths: Unix socket paths are capped.
    temp_dir = tempfile.mkdtemp(prefix=temp_prefix, dir="/tmp")
    proc = subprocess.Popen(
        [
            BIN / "ray",
            "start",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={cpus}",
            "--num-gpus=0",
            f"--object-store-memory={object_store_bytes}",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
            *port_flags(*_NODE_PORTS),
            *args,
        ],
        env=dict(env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        # A process group per node (`ray start --block` and every process it starts): it can be stopped
        # without touching any other Ray on this machine, which `ray stop` would.
        start_new_session=True,
    )
    return RayNode(proc, temp_dir)


def kill_ray_nodes(nodes: Sequence[RayNode]) -> None:
    """SIGKILL to each node's process group, as a lost machine (no goodbye to the GCS; a throwaway
    cluster needs no graceful stop, which took 20 s), then to whatever process still names a node's temp
    dir (one that left the group), then the temp dirs removed."""
    # Imported here: psutil is a development dependency, and only stopping a cluster needs it.
    import psutil

    for node in nodes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.proc.pid, signal.SIGKILL)
        node.proc.wait()
    marks = [node.temp_dir for node in nodes]
    leftovers = [
        p
        for p in psutil.process_iter(["cmdline"])
        if p.pid != os.getpid() and any(m in " ".join(p.info["cmdline"] or []) for m in marks)
    ]
    for p in leftovers:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(leftovers, timeout=10)
    for temp_dir in marks:
        shutil.rmtree(temp_dir, ignore_errors=True)


class RayCluster:
    """A Ray cluster of `ray start --block` processes on 127.0.0.1: a head and `workers` worker nodes,
    each a process group with a temp dir of its own, stopped by killing those groups.

    Starting waits for the head's GCS (and its dashboard, when on), not for the workers to join: callers
    wait for the nodes their own way (a connected driver, or the state API with their token).

    Attributes:
        gcs_address: HOST:PORT of the head's GCS, for `ray.init(address=...)` and worker nodes.
        dashboard_url: http://HOST:PORT of the dashboard and its Jobs API, or None when off.
        head: The head node.
        workers: The worker nodes, in the order they started.
    """

    def __init__(
        self,
        workers: int,
        *,
        head_cpus: int,
        worker_cpus: int,
        env: Mapping[str, str],
        head_env: Mapping[str, str] | None = None,
        dashboard: bool = False,
        temp_prefix: str = "ltrp-ray-",
        object_store_bytes: int = 200_000_000,
    ) -> None:
        """Starts the cluster; on any failure stops whatever of it started, and raises.

        Args:
            workers: Worker nodes besides the head.
            head_cpus: The head's logical CPUs (0: every task and actor runs on the workers).
            worker_cpus: Each worker node's logical CPUs.
            env: Every node's environment (`ray_node_env`).
            head_env: Variables for the head only, over `env` (e.g. its health-check settings).
            dashboard: Whether the head runs the dashboard and its Jobs API.
            temp_prefix: Prefix of the nodes' temp dirs under /tmp (tells whose leftovers they are).
            object_store_bytes: Each node's object store size.
        """
        self.env = dict(env)
        self.worker_cpus = worker_cpus
        self.temp_prefix = temp_prefix
        self.object_store_bytes = object_store_bytes
        self.head: RayNode | None = None
        self.workers: list[RayNode] = []
        gcs, dashboard_port = free_port(), free_port()
        self.gcs_address = f"127.0.0.1:{gcs}"
        self.dashboard_url = f"http://127.0.0.1:{dashboard_port}" if dashboard else None
        if dashboard:
            flags = [
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard_port}",
            ]
        else:  # its port still set: the default one may be another Ray's
            flags = ["--include-dashboard=false", f"--dashboard-port={dashboard_port}"]
        try:
            self.head = start_ray_node(
                ["--head", f"--port={gcs}", *flags, *port_flags("ray-client-server-port")],
                head_cpus,
                self.env | dict(head_env or {}),
                temp_prefix,
                object_store_bytes,
            )
            wait_for_port(gcs, self.head.proc, timeout=60)
            for _ in range(workers):
                self.add_worker()
            if dashboard:
                wait_for_port(dashboard_port, self.head.proc, timeout=60)
        except BaseException:
            self.stop()
            raise

    def add_worker(self) -> RayNode:
        """Starts one more worker node (as an autoscaler would), without waiting for it to join."""
        node = start_ray_node(
            [f"--address={self.gcs_address}"],
            self.worker_cpus,
            self.env,
            self.temp_prefix,
            self.object_store_bytes,
        )
        self.workers.append(node)
        return node

    def kill_worker(self, node: RayNode) -> None:
        """Loses a worker node as a machine is lost: SIGKILL to all its processes."""
        self.workers.remove(node)
        kill_ray_nodes([node])

    def stop(self) -> None:
        """Kills every node, workers first (`kill_ray_nodes`)."""
        nodes = [*self.workers, *([self.head] if self.head is not None else [])]
        self.workers, self.head = [], None
        kill_ray_nodes(nodes)
