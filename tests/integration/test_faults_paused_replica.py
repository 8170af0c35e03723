"""A replica SIGSTOPped mid-export past its lease, then SIGCONT, for real (its own process): another
replica takes its slices over and completes the job; the resumed replica is fenced. Its runs stop
("lease lost"), nothing it wrote is left (no part, no partial file), it changes the job no more (its
version stays), and the file is there once, whole: every user once, in order.
"""
from __future__ import annotations

import csv
import io
import os
import pathlib
import re
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.databases import BACKENDS, seeded_postgres_database
from tests.harness import ServerHandle, ServerProcess
from tests.integration.support import Caller, download
from tests.polling import eventually
from userexport.v1 import users_export_pb2 as pb

pytestmark = pytest.mark.skipif("postgresql" not in BACKENDS, reason="replicas share PostgreSQL")

USERS = 100_000
LEASE = 2.0
SETTINGS: dict[str, Any] = {"slice_users": USERS // 4, "gzip_level": 9, "lease_seconds": LEASE}


@pytest.fixture
def seeded() -> Iterator[tuple[str, str]]:
    with seeded_postgres_database(USERS) as seeded:
        yield seeded


def files_of(folder: pathlib.Path) -> list[str]:
    """Every file in a job's folder, partial ones included."""
    return sorted(os.listdir(folder)) if folder.exists() else []


def slices_held(log: str, job_id: str) -> int:
    """The job's slices a replica's log shows it claimed and not yet done."""
    return log.count(f"slice claimed job_id={job_id}") - log.count(f"slice done job_id={job_id}")


def pause_holding_a_slice(server: ServerProcess, job_id: str) -> str:
    """SIGSTOP the replica while it holds a slice of the job, and return its log as it stopped (a
    stopped process writes nothing more). Between two slices it holds none, and on a quick machine
    its first progress can come after its first slices are done: then it is let go and tried again."""
    def attempt() -> str | None:
        server.signal(signal.SIGSTOP)
        log = server.log_text()
        if slices_held(log, job_id):
            return log
        server.signal(signal.SIGCONT)
        return None
    return eventually(attempt, "A stopped while holding a slice", timeout=30, every=0.02)


def test_a_replica_paused_past_its_lease_is_fenced_and_the_file_is_made_once_whole(
        seeded: tuple[str, str], tmp_path: pathlib.Path) -> None:
    url, tenant = seeded
    env = {"USEREXPORT_DATABASE_URL": url, "USEREXPORT_WORKERS": "2",
           **{f"USEREXPORT_{name.upper()}": str(value) for name, value in SETTINGS.items()}}
    a = ServerProcess(tmp_path, env)
    b: ServerHandle | None = None
    try:
        caller = Caller(a, tenant)  # type: ignore[arg-type]
        job = caller.create(format=pb.ExportRequest.CSV)
        eventually(lambda: caller.get(job.id).users_written > 0, "A exporting", timeout=60)
        before = pause_holding_a_slice(a, job.id)
        held = slices_held(before, job.id)
        try:
            b = ServerHandle(tmp_path, database_url=url, workers=2, **SETTINGS)
            watcher = Caller(b, tenant)
            final = watcher.finish(job.id)
        finally:
            a.signal(signal.SIGCONT)
        assert final.status == pb.Job.COMPLETED, final.error
        folder = tmp_path / "files" / tenant / job.id
        # Each slice A held ends after the pause: its heartbeat finds the lease lost ("slice stopped"),
        # its read fails first (a failed attempt), or its finish is refused ("slice done ... recorded=False").
        since = lambda: a.log_text()[len(before):]
        ends = ("slice stopped", "export attempt failed, will retry", "export failed", "slice done")
        eventually(lambda: sum(since().count(f"{end} job_id={job.id}") for end in ends) >= held, "A's slices fenced",
                   timeout=LEASE * 5)
        time.sleep(LEASE)  # A's heartbeats and progress calls have all run by now
        assert files_of(folder) == [f"{tenant}.csv.gz"], "A left something behind"
        assert watcher.get(job.id).version == final.version, "A changed the job after it completed"
        recorded = re.search(f"slice done job_id={job.id} .*recorded=True", since())
        assert not recorded, "A recorded a slice it no longer held"
        rows = list(csv.reader(io.StringIO(download(final.location).decode(), newline="")))
        ids = [row[0] for row in rows[1:]]
        assert rows[0][0] == "user_id" and len(ids) == final.users_written == USERS and ids == sorted(set(ids))
    finally:
        if b is not None:
            b.stop()
        a.stop()
