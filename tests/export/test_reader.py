"""The PostgreSQL reader's own connection: it takes the caller's export settings, and a query cancelled
(by the reader, or by a worker's run that the reader registered with, as jobs/phases.py does) or
terminated surfaces at once as the transient error the worker retries (DatabaseUnavailable once
translated)."""
from __future__ import annotations

import contextlib
import subprocess
import sys

import psycopg
import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError

from tests.databases import ADMIN_DSN
from tests.export.support import MemoryWriter, new_tenant
from tests.integration.pg_faults import admin_execute
from tests.polling import eventually
from userexport_server.api.requests import build_spec
from userexport_server.db.engine import canceller
from userexport_server.db.faults import DatabaseUnavailable, translated
from userexport_server.export.engine import run_export
from userexport_server.export.reader import ColumnReader
from userexport_server.jobs.runs import Run
from userexport_server.seed import seed_users

JSON = build_spec(format="json", connection_id=None, limit=None, fields=[])


@pytest.fixture(scope="module")
def seeded(engine: Engine) -> tuple[Engine, str]:
    if engine.dialect.name != "postgresql":
        pytest.skip("the reader's own connection is PostgreSQL's")
    tenant = new_tenant()
    seed_users(engine, tenant=tenant, users=20_000)
    return engine, tenant


def test_the_reader_runs_with_the_callers_statement_timeout(seeded: tuple[Engine, str]) -> None:
    engine, tenant = seeded
    with engine.connect() as conn:
        conn.execute(text("SET LOCAL statement_timeout = 1"))
        with pytest.raises(psycopg.OperationalError, match="statement timeout"):
            run_export(conn, tenant, JSON, MemoryWriter())


@pytest.mark.parametrize("how", ["cancel", "terminate", "the run's cancel"])
def test_a_stopped_query_surfaces_at_once_as_a_transient_error(seeded: tuple[Engine, str], how: str) -> None:
    engine, tenant = seeded
    readers: list[ColumnReader] = []
    calls: list[int] = []

    def progress(written: int) -> bool:
        if not calls:
            if how == "cancel":
                readers[0].cancel()
            elif how == "terminate":
                admin_execute("SELECT pg_terminate_backend(%s)", (readers[0].backend_pid,))
            else:  # what a cancel, a stall or shutdown does to a worker's run
                run.cancel("test")
        calls.append(written)
        return True

    def registered(reader: ColumnReader) -> None:
        readers.append(reader)
        reads.enter_context(run.cancellable(reader.cancel))

    # As a worker does: the run cancels both the caller's connection and the reader (after the
    # caller's canceller, closing its connection fails too, translated alike).
    run = Run("job_test", "slice")
    with (pytest.raises(DatabaseUnavailable) as raised, translated(), engine.connect() as conn,
          run.cancellable(canceller(conn)), contextlib.ExitStack() as reads):
        run_export(conn, tenant, JSON, MemoryWriter(), progress=progress, batch_rows=100, on_query=registered)
    assert isinstance(raised.value.__cause__, psycopg.OperationalError | OperationalError)
    assert calls[-1] < 20_000  # stopped, not read to the end
    pid = readers[0].backend_pid
    active = lambda: admin_execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s AND state = 'active'", (pid,))
    eventually(lambda: not active() or None, "the stopped query's backend idle or gone", timeout=30)


def test_a_query_on_a_terminated_connection_raises_instead_of_aborting_the_process(seeded: tuple[Engine, str]) -> None:
    """adbc-driver-postgresql 1.8.0 aborts the whole process here (std::logic_error from a null
    SQLSTATE, apache/arrow-adbc#3878, reported on 1.9 and 1.10 too; 1.13.0 raises): the reader's
    connection is terminated between its setup and its query, as pg_terminate_backend or a restart
    does. Run in a process of its own, which an abort would kill."""
    engine, tenant = seeded
    script = f"""
import psycopg
from userexport_server.db.engine import make_engine
from userexport_server.export.reader import open_reader
from userexport_server.export.sql import projection
from userexport_server.api.requests import build_spec
engine = make_engine({engine.url.render_as_string(hide_password=False)!r})
with engine.connect() as conn:
    reader = open_reader(conn, projection(build_spec(format="csv", connection_id=None, limit=None, fields=[]),
                                          {tenant!r}, "postgresql"))
    with psycopg.connect({ADMIN_DSN!r}, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (reader.backend_pid,))
    try:
        list(reader)
    except psycopg.OperationalError as error:
        print("raised", type(error).__name__)
    reader.close()
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout.strip()) == (0, "raised OperationalError"), done.stderr[-2000:]
