"""Export workers survive real database faults: a held SQLite lock, terminated PostgreSQL backends.

Each test checks the job ends in a terminal state (never stuck PROCESSING), the worker threads are
still alive afterwards (WorkerPool.healthy() is None) and a new job on the same server completes.
"""
from __future__ import annotations

import contextlib
import csv
import io
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest

from tests.databases import database_settings
from tests.harness import ServerHandle, new_tenant
from tests.integration.support import Caller, download, wait_until_writing
from tests.polling import eventually
from userexport.v1 import users_export_pb2 as pb
from userexport_server.db.engine import EXPORT_APPLICATION_NAME

USERS = 100_000
# The PostgreSQL faults act on an export that runs a few seconds after its first progress write
# (at most every 0.5 s): one slice of 300,000 users.
PG_USERS = 3 * USERS


def assert_still_serving(server: ServerHandle, caller: Caller) -> None:
    """The workers lived through the fault: health says so and a new export completes."""
    assert server.app.workers.healthy() is None
    assert caller.finish(caller.create(format=pb.ExportRequest.CSV, limit=10).id).status == pb.Job.COMPLETED


@contextlib.contextmanager
def exclusive_lock(database: str) -> Iterator[None]:
    """Another process's writer on the server's SQLite file: BEGIN EXCLUSIVE until the block ends."""
    holder = sqlite3.connect(database, isolation_level=None, timeout=30)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        holder.execute("COMMIT")
        holder.close()


def files_committed(server: ServerHandle, job_id: str) -> bool:
    return any(p.is_file() and not p.name.startswith(".") for p in (server.data_dir / "files").rglob(f"{job_id}/*"))


def test_sqlite_lock_through_the_end_of_an_export_delays_the_complete_write_which_is_retried(
        make_server, backend: str, caplog: pytest.LogCaptureFixture) -> None:
    """Progress writes and the final `complete` hit `database is locked` after the busy timeout;
    the export goes on, `complete` is retried until the lock is gone, and the job COMPLETES in
    its first attempt."""
    if backend != "sqlite":
        pytest.skip("an exclusive lock from another connection is SQLite's fault")
    users = PG_USERS  # one slice, long enough under the lock for a progress write (every 0.5 s at most)
    server = make_server(db_busy_timeout_seconds=0.3, gzip_level=9, slice_users=users)
    tenant = new_tenant()
    server.seed(users, tenant=tenant)
    caller = Caller(server, tenant)
    job = caller.create(format=pb.ExportRequest.JSON)
    wait_until_writing(caller, job.id)
    caplog.set_level(logging.WARNING, logger="userexport_server")
    with exclusive_lock(str(server.data_dir / "userexport.db")):
        # the export ran to its end under the lock
        eventually(lambda: files_committed(server, job.id), "the export finishing its file", timeout=60)
        time.sleep(1.0)  # more than the busy timeout: the first `complete` fails
    final = caller.finish(job.id)
    assert final.status == pb.Job.COMPLETED, final.error
    assert len(download(final.location).splitlines()) == users
    assert server.app.store.get_any(job.id).attempts == 1  # the write was retried, not the export
    assert f"retrying slice done job_id={job.id}" in caplog.text
    assert f"progress write failed, export goes on job_id={job.id}" in caplog.text
    assert_still_serving(server, caller)


def test_sqlite_lock_while_idle_workers_claim_is_survived(make_server, backend: str,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """Claims fail with `database is locked` while the lock is held; the claim loop logs, backs
    off, and claims the next job once the lock is gone."""
    if backend != "sqlite":
        pytest.skip("an exclusive lock from another connection is SQLite's fault")
    server = make_server(db_busy_timeout_seconds=0.2)
    tenant = new_tenant()
    server.seed(20, tenant=tenant)
    caplog.set_level(logging.ERROR, logger="userexport_server.jobs.worker")
    with exclusive_lock(str(server.data_dir / "userexport.db")):
        eventually(lambda: "claiming work failed" in caplog.text, "a claim running into the lock", timeout=10)
    assert_still_serving(server, Caller(server, tenant))


@pytest.fixture(scope="module")
def pg_server(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    """A PostgreSQL server whose exports of PG_USERS take a few seconds (gzip level 9, one slice), to act mid-way."""
    if backend != "postgresql":
        pytest.skip("pg_terminate_backend is PostgreSQL's fault")
    with database_settings(backend) as database:
        server = ServerHandle(tmp_path_factory.mktemp("pg-faults"), gzip_level=9, slice_users=PG_USERS, **database)
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture(scope="module")
def pg_tenant(pg_server: ServerHandle) -> str:
    tenant = new_tenant()
    pg_server.seed(PG_USERS, tenant=tenant)
    return tenant


def terminate_exports(server: ServerHandle) -> int:
    """pg_terminate_backend every connection of this server's database counting or reading users for an
    export: what export_reads names `userexport-export` (the reader's own connection takes the name too)."""
    database = server.app.engine.url.database
    with psycopg.connect(server.settings.database_url, autocommit=True) as admin:
        return len(admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid() "
            "AND application_name = %s", (database, EXPORT_APPLICATION_NAME)).fetchall())


def test_pg_export_connection_terminated_mid_export_is_retried_and_completes(
        pg_server: ServerHandle, pg_tenant: str, caplog: pytest.LogCaptureFixture) -> None:
    """The export's backend is terminated while it streams users: that attempt fails with a
    lost connection, the slice is handed back and its next attempt writes the whole file."""
    caplog.set_level(logging.INFO, logger="userexport_server")
    server = pg_server
    caller = Caller(server, pg_tenant)
    job = caller.create(format=pb.ExportRequest.CSV)
    wait_until_writing(caller, job.id)
    eventually(lambda: terminate_exports(server), "finding an export connection to terminate", timeout=10, every=0.01)
    final = caller.finish(job.id)
    assert final.status == pb.Job.COMPLETED, final.error
    rows = list(csv.reader(io.StringIO(download(final.location).decode(), newline="")))
    assert final.users_written == PG_USERS and len(rows) == PG_USERS + 1  # and the header
    assert f"slice claimed job_id={job.id} tenant={pg_tenant} slice=0 attempt=2 rescued=True" in caplog.text
    assert "attempt=3" not in caplog.text
    assert_still_serving(server, caller)


def test_pg_export_losing_its_connection_on_every_attempt_fails_after_three_with_a_clear_message(
        pg_server: ServerHandle, pg_tenant: str) -> None:
    """Every attempt's backend is terminated: after the third the job is FAILED, and the error
    names the cause (the database) and no SQL or driver detail."""
    server = pg_server
    caller = Caller(server, pg_tenant)
    job = caller.create(format=pb.ExportRequest.JSON)
    done = threading.Event()

    def keep_terminating() -> None:
        while not done.wait(0.02):
            terminate_exports(server)

    killer = threading.Thread(target=keep_terminating)
    killer.start()
    try:
        final = caller.finish(job.id)
    finally:
        done.set()
        killer.join()
    assert final.status == pb.Job.FAILED
    assert final.error.startswith("The export failed after 3 attempts: the database was unavailable"), final.error
    assert "SELECT" not in final.error and "psycopg" not in final.error
    assert_still_serving(server, caller)
