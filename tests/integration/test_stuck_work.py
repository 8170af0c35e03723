"""Work stuck in the database, caused for real: the backend streaming an export is SIGSTOPped (a hung
connection: the kernel still answers TCP, so no keepalive notices), and the LISTEN backend is too.

- The stalled slice's lease is no longer renewed; its read is cancelled in place and the slice is
  handed back, so a replica exports it again within lease + stall bound, and the file is whole.
- SIGTERM ends the server within its grace period plus a few seconds, exit 0, though its export
  waits on the stopped backend; another replica then finishes the job, whole.
- With the listening backend stopped, creates and reads still answer at once: nothing on their path
  waits for a notification connection.
"""
from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import pathlib
import signal
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from tests.databases import BACKENDS, seeded_postgres_database
from tests.harness import ServerHandle, ServerProcess
from tests.integration.pg_faults import listener_pids
from tests.integration.support import Caller, download
from tests.polling import eventually
from userexport.v1 import users_export_pb2 as pb
from userexport_server.db.engine import EXPORT_APPLICATION_NAME

pytestmark = pytest.mark.skipif("postgresql" not in BACKENDS, reason="a SIGSTOPped backend is PostgreSQL's fault")

USERS = 300_000
LEASE, STALL = 2.0, 3.0
# Slow exports (gzip level 9, one slice), so a fault lands mid-stream.
SETTINGS: dict[str, Any] = {"gzip_level": 9, "slice_users": USERS, "lease_seconds": LEASE, "stall_seconds": STALL}


@pytest.fixture(scope="module")
def seeded() -> Iterator[tuple[str, str]]:
    """A database of USERS users of one tenant, shared by this module's tests."""
    with seeded_postgres_database(USERS) as seeded:
        yield seeded


def export_backend(url: str, timeout: float = 20.0) -> int:
    """The pid of the backend reading users for an export."""
    def find() -> int | None:
        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND "
                               "application_name = %s AND state = 'active' AND query ILIKE 'COPY%%' LIMIT 1",
                               (EXPORT_APPLICATION_NAME,)).fetchone()
        return None if row is None else int(row[0])
    return eventually(find, "an export reading users", timeout=timeout)


def wait_event(url: str, pid: int) -> str | None:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT wait_event FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
    return None if row is None else row[0]


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    """SIGSTOP a backend until the block ends (then SIGCONT: it finds its socket gone and exits)."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


@contextlib.contextmanager
def stopped_sending(url: str, pid: int) -> Iterator[None]:
    """SIGSTOP an export's backend while it waits to send rows (ClientWrite): hung the way a replica
    can rescue. A backend stopped inside a data file read (DataFileRead) keeps that page's buffer I/O
    in progress, and every backend that reads the page waits on it (BufferIO) until the hung one
    goes: no replica can read past it, so that is PostgreSQL's fault to fix (kill the backend), not
    the service's. The backend's own wait event, read after the stop, says where it stopped."""
    def stop() -> bool:
        if wait_event(url, pid) != "ClientWrite":
            return False
        os.kill(pid, signal.SIGSTOP)
        if wait_event(url, pid) == "ClientWrite":
            return True
        os.kill(pid, signal.SIGCONT)
        return False
    eventually(stop, "the export backend stopped while sending", timeout=30, every=0.01)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def wait_until_writing(caller: Caller, job_id: str) -> None:
    eventually(lambda: caller.get(job_id).users_written > 0, "the export writing", timeout=60)


def assert_whole(job: pb.Job) -> None:
    assert job.status == pb.Job.COMPLETED, job.error
    rows = list(csv.reader(io.StringIO(download(job.location).decode(), newline="")))
    ids = [row[0] for row in rows[1:]]
    assert job.users_written == USERS and len(ids) == USERS and ids == sorted(set(ids))


def test_a_stalled_export_is_cancelled_handed_back_and_rescued_whole(
        seeded: tuple[str, str], tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="userexport_server")
    url, tenant = seeded
    a = ServerHandle(tmp_path, database_url=url, workers=1, **SETTINGS)
    b: ServerHandle | None = None
    try:
        assert a.app.workers is not None
        caller = Caller(a, tenant)
        job = caller.create(format=pb.ExportRequest.CSV)
        wait_until_writing(caller, job.id)
        with stopped_sending(url, export_backend(url)):
            since = time.monotonic()
            b = ServerHandle(tmp_path, database_url=url, workers=1, **SETTINGS)
            eventually(lambda: f"slice claimed job_id={job.id} tenant={tenant} slice=0 attempt=2" in caplog.text,
                       "the slice claimed again", timeout=LEASE + STALL + 5)
            rescued = time.monotonic() - since
            final = caller.finish(job.id)
        assert rescued <= LEASE + STALL + 2, f"rescued after {rescued:.1f} s"
        assert f"work stalled, cancelled and handed back job_id={job.id}" in caplog.text
        assert_whole(final)
        assert a.app.workers.healthy() is None, "A's stalled run ended, yet health still reports it"
    finally:
        a.stop()
        if b is not None:
            b.stop()


def test_sigterm_ends_within_grace_though_the_export_waits_on_a_stopped_backend(
        seeded: tuple[str, str], tmp_path: pathlib.Path) -> None:
    url, tenant = seeded
    grace = 2.0
    env = {"USEREXPORT_DATABASE_URL": url, "USEREXPORT_WORKERS": "1", "USEREXPORT_GZIP_LEVEL": "9",
           "USEREXPORT_SLICE_USERS": str(USERS), "USEREXPORT_LEASE_SECONDS": str(LEASE),
           "USEREXPORT_STALL_SECONDS": "600", "USEREXPORT_SHUTDOWN_GRACE_SECONDS": str(grace)}
    a = ServerProcess(tmp_path, env)
    b: ServerHandle | None = None
    try:
        caller = Caller(a, tenant)  # type: ignore[arg-type]
        job = caller.create(format=pb.ExportRequest.CSV)
        wait_until_writing(caller, job.id)
        with stopped(export_backend(url)):
            since = time.monotonic()
            a.signal(signal.SIGTERM)
            assert a.wait(grace + 10) == 0, a.log_text()
            took = time.monotonic() - since
        assert took <= grace + 5, f"SIGTERM took {took:.1f} s with a {grace} s grace"
        b = ServerHandle(tmp_path, database_url=url, workers=1, **SETTINGS)
        assert_whole(Caller(b, tenant).finish(job.id))
    finally:
        a.stop()
        if b is not None:
            b.stop()


def test_creates_answer_at_once_while_the_listening_backend_is_stopped(
        seeded: tuple[str, str], tmp_path: pathlib.Path) -> None:
    url, tenant = seeded
    a = ServerHandle(tmp_path, database_url=url, workers=0)
    try:
        caller = Caller(a, tenant)
        pid, = listener_pids(url)
        with stopped(pid):
            for _ in range(5):
                started = time.monotonic()
                job = caller.stub.CreateUsersExportJob(pb.ExportRequest(format=pb.ExportRequest.CSV, limit=1),
                                                       metadata=caller.metadata, timeout=5)
                assert time.monotonic() - started < 1.0
                assert caller.get(job.id).status == pb.Job.PENDING
                caller.cancel(job.id)
    finally:
        a.stop()
