"""The output lease on a local folder and on the moto S3 server: one holder at a time, renewed while
held, taken over once its holder is gone, and never by two racing jobs at once."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import fsspec
import pytest

from ltrp.pipeline.lease import LEASE_FILE, Lease, LeaseHeld


@pytest.fixture(params=["local", "s3"])
def folder(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "out")
    return request.getfixturevalue("s3_bucket") + "/out"


def test_a_held_output_is_refused_naming_its_holder_and_free_again_once_released(folder: str) -> None:
    held = r"is being written by jobs\.score \(host .*, pid \d+\)"
    with Lease(folder, "jobs.score"), pytest.raises(LeaseHeld, match=held):
        Lease(folder, "jobs.rank").acquire()
    with Lease(folder, "jobs.rank"):  # released on exit
        pass
    fs, root = fsspec.core.url_to_fs(folder)
    assert not fs.exists(f"{root}/{LEASE_FILE}")


def test_a_held_lease_is_renewed_past_its_lifetime(folder: str) -> None:
    with Lease(folder, "first", seconds=1.5) as first:
        time.sleep(3.5)  # two lifetimes: alive only through renewals
        with pytest.raises(LeaseHeld):
            Lease(folder, "second").acquire()
        first.check()  # still ours


def test_an_expired_lease_is_taken_over_and_its_holder_learns_it_lost_it(folder: str) -> None:
    stale = Lease(folder, "stale", seconds=0.5)
    stale.acquire()  # never renewed: as a holder that hangs
    time.sleep(1.0)
    with Lease(folder, "next"):
        assert not stale._renew()
    stale.release()  # not ours any more: a no-op
    Lease(folder, "third").acquire()


def test_the_lease_of_a_process_gone_from_this_host_is_taken_over_at_once(folder: str) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    lease = Lease(folder, "killed")
    lease.acquire()
    fs, root = fsspec.core.url_to_fs(folder)
    holder = json.loads(fs.cat_file(f"{root}/{LEASE_FILE}"))
    fs.pipe_file(f"{root}/{LEASE_FILE}", json.dumps({**holder, "pid": dead.pid, "token": "old"}).encode())
    with Lease(folder, "rerun"):  # within the lifetime, but its process has ended
        pass


def test_racing_jobs_for_one_output_claim_it_once(folder: str) -> None:
    Lease(folder, "warm-up").fs.makedirs(folder, exist_ok=True)
    start, won, refused = threading.Barrier(6), [], []

    def race(i: int) -> None:
        start.wait()
        try:
            Lease(folder, f"job {i}").acquire()
            won.append(i)
        except LeaseHeld:
            refused.append(i)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 5
