"""An exclusive, expiring claim on a job's output (a local folder or an s3:// prefix): at most one job
writes there at a time.

The lease is one small JSON object, FOLDER/_ltrp_lease.json, naming its holder and when it expires.
It is created only if absent (an S3 conditional write, If-None-Match: *; locally a hard link, which
fails if the name exists) and renewed by its holder in a background thread, each renewal conditional
on the object still being the holder's own (If-Match on its ETag). A job that finds a live lease
refuses, naming the holder. A holder that died stops renewing: its lease expires and the next run
takes it over (conditionally again, so two runs racing for an expired lease cannot both win); on the
holder's own machine a lease whose process is gone is taken over at once.
"""

from __future__ import annotations

import json
import os
import posixpath
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ltrp.pipeline.configs import InputError

LEASE_FILE = "_ltrp_lease.json"
#: Seconds a lease lives without renewal; the holder renews it every third of that.
LEASE_SECONDS = 60.0


class LeaseHeld(InputError):
    """Another job holds the output; the message names it and when its lease expires. (An input error:
    the launchers report it as one, exit code 2, nothing written.)"""


@dataclass(frozen=True)
class Holder:
    job: str  # what the holder is doing, e.g. "jobs.score"
    host: str
    pid: int
    token: str  # this claim's id: a renewal or release only touches a lease that carries it
    expires: float  # unix time

    def describe(self) -> str:
        until = datetime.fromtimestamp(self.expires, UTC).isoformat(timespec="seconds")
        return f"{self.job} (host {self.host}, pid {self.pid}), its lease live until {until}"

    def gone(self) -> bool:
        """Expired, or its process on this host has ended."""
        if time.time() > self.expires:
            return True
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False


class Lease:
    """The lease on `folder` for `job`; use as a context manager (acquire, renew, release).

    Raises:
        LeaseHeld: on entry, when another live job holds the folder.
    """

    def __init__(self, folder: str, job: str, seconds: float = LEASE_SECONDS) -> None:
        self.fs, root = fsspec.core.url_to_fs(folder.rstrip("/"))
        self.uri = folder.rstrip("/")
        self.path = posixpath.join(root, LEASE_FILE)
        self.job, self.seconds = job, seconds
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None  # why the lease was lost while held, if it was

    def __enter__(self) -> Lease:
        self.acquire()
        self._thread = threading.Thread(target=self._renew_until_stopped, name="ltrp-lease", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.release()

    def acquire(self) -> None:
        """Creates the lease, or takes over one whose holder is gone."""
        self.fs.makedirs(posixpath.dirname(self.path), exist_ok=True)
        if self._create():
            return
        current, tag = self._read()
        if current is None:  # released between our two calls: try once more
            if self._create():
                return
            current, tag = self._read()
        if current is not None and not current.gone():
            raise LeaseHeld(
                f"{self.uri} is being written by {current.describe()}; wait for it or use another output"
            )
        if not self._replace(tag):
            raise LeaseHeld(f"{self.uri}: another job took over the expired lease at the same moment")

    def check(self) -> None:
        """Raises if the lease was lost while held (a renewal found another holder's lease)."""
        if self.lost:
            raise LeaseHeld(
                f"{self.uri}: this job lost its lease ({self.lost}); stopping before writing more"
            )

    def release(self) -> None:
        current, _ = self._read()
        if current is not None and current.token == self.token:
            self.fs.rm_file(self.path)

    def _holder(self) -> bytes:
        holder = Holder(self.job, socket.gethostname(), os.getpid(), self.token, time.time() + self.seconds)
        return json.dumps(asdict(holder)).encode()

    def _read(self) -> tuple[Holder | None, str | None]:
        """The current lease and its tag (ETag on S3, the token locally), or (None, None)."""
        try:
            info = self.fs.info(self.path, refresh=True) if not self._local else None
            holder = Holder(**json.loads(self.fs.cat_file(self.path)))
        except FileNotFoundError:
            return None, None
        return holder, (holder.token if self._local else info["ETag"])

    @property
    def _local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def _create(self) -> bool:
        data = self._holder()
        try:
            if self._local:
                tmp = f"{self.path}.{self.token}.tmp"
                self.fs.pipe_file(tmp, data)
                try:
                    os.link(tmp, self.path)  # atomic, and fails if the name exists
                finally:
                    os.unlink(tmp)
            else:
                self.fs.pipe_file(self.path, data, mode="create")  # If-None-Match: *
        except FileExistsError:  # someone's, or ours if a retried write had already succeeded
            current, _ = self._read()
            return current is not None and current.token == self.token
        return True

    def _replace(self, tag: str | None) -> bool:
        """Takes over the lease if it still is the one tagged `tag` (an expired one)."""
        if not self._local:
            return self._put_if_match(tag)
        # No compare-and-swap on a local disk: move the lease aside (one mover wins), check that it is
        # the one judged gone, then create ours; a lease moved by mistake is put back.
        aside = f"{self.path}.{self.token}.old"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return self._create()
        try:
            if json.loads(Path(aside).read_bytes())["token"] != tag:
                os.link(aside, self.path)
                return False
        finally:
            os.unlink(aside)
        return self._create()

    def _renew(self) -> bool:
        """Extends our lease; False if it is no longer ours."""
        current, tag = self._read()
        if current is None or current.token != self.token:
            return False
        if not self._local:
            return self._put_if_match(tag)
        tmp = f"{self.path}.{self.token}.tmp"
        self.fs.pipe_file(tmp, self._holder())
        os.replace(tmp, self.path)
        return True

    def _put_if_match(self, tag: str | None) -> bool:
        try:
            self.fs.pipe_file(self.path, self._holder(), IfMatch=tag)
        except OSError:  # 412: the object is no longer the one tagged (FileNotFoundError: gone)
            return False
        return True

    def _renew_until_stopped(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            if not self._renew():
                current, _ = self._read()
                self.lost = f"now held by {current.describe()}" if current else "the lease object was deleted"
                return


def check_holder(folder: str, token: str) -> None:
    """For a worker about to write for the job holding `folder`'s lease under `token` (the job passes
    its token to its stages): raises unless that lease is still the current one.

    Raises:
        LeaseHeld: the lease is gone or another job's.
    """
    current, _ = Lease(folder, "check")._read()
    if current is None or current.token != token:
        holder = current.describe() if current else "nobody"
        raise LeaseHeld(f"{folder.rstrip('/')}: the job lost its lease (now held by {holder}); not writing")
