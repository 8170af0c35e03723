"""Engine creation: one place that knows SQLite's and PostgreSQL's connection quirks."""
from __future__ import annotations

import contextlib
import functools
import os
import pathlib
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import Connection, Engine, create_engine, event, text

from userexport_server.db.faults import translated
from userexport_server.private_files import create_private_file

# TCP keepalives on every PostgreSQL connection: a database host that vanished is noticed after
# 10 s idle and 3 probes 5 s apart, instead of libpq's default of about two hours.
# What an export's reads are called in pg_stat_activity.
EXPORT_APPLICATION_NAME = "userexport-export"
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}


def _compact_json(value: Any) -> str:
    """Compact JSON text, so exports can copy stored JSON to the file unchanged."""
    return orjson.dumps(value).decode()


@dataclass(frozen=True, slots=True)
class Timeouts:
    """How long one database call may wait, so a stalled database turns into an error, not a hang.

    `busy`: SQLite waiting for another writer's lock. `statement`: PostgreSQL running one statement
    (exports lift it, see `unbounded_statements`). `pool`: waiting for a free pooled connection.
    `connect`: opening a PostgreSQL connection. `idle`: a PostgreSQL session idle inside a
    transaction this long is ended by the server, which frees its locks: a replica paused in the
    middle of one (SIGSTOP, a frozen VM) would otherwise hold its job's row and advisory lock for as
    long as it stays paused, and every other replica's writes to that job, and claims of its
    slices, would wait (tests/integration/test_faults_paused_replica.py). The service's own
    transactions last milliseconds; an export's reading transaction lifts it (`export_reads`).
    """

    busy: float = 5.0
    statement: float = 30.0
    pool: float = 10.0
    connect: float = 5.0
    idle: float = 5.0


def make_engine(url: str, timeouts: Timeouts = Timeouts(), origin: str = "", **kwargs: Any) -> Engine:
    """An engine for `url`; SQLite gets WAL, a busy timeout and foreign keys so threads can share it.

    On PostgreSQL, `origin` becomes each connection's `userexport.origin` setting, which the job
    trigger puts into its notifications (migration 0005), so this process knows its own echoes.
    """
    if url.startswith("postgresql") and "+" not in url.split("://", 1)[0]:
        url = url.replace("postgresql", "postgresql+psycopg", 1)
    is_sqlite = url.startswith("sqlite")
    options: dict[str, Any] = {"json_serializer": _compact_json, "json_deserializer": orjson.loads}
    if is_sqlite:
        options["connect_args"] = {"check_same_thread": False, "timeout": timeouts.busy}
    else:
        settings = f"-c statement_timeout={round(timeouts.statement * 1000)}" + \
            f" -c idle_in_transaction_session_timeout={round(timeouts.idle * 1000)}" + \
            (f" -c userexport.origin={origin}" if origin else "")
        options.update(pool_pre_ping=True, pool_size=10, max_overflow=20, pool_timeout=timeouts.pool, connect_args={
            "connect_timeout": max(1, round(timeouts.connect)), "options": settings, **KEEPALIVES})
    options.update(kwargs)
    engine = create_engine(url, **options)  # connects on first use, not here
    if is_sqlite:
        event.listen(engine, "connect", functools.partial(_sqlite_pragmas, busy_ms=round(timeouts.busy * 1000)))
        event.listen(engine, "begin", _sqlite_begin)
    return engine


def prepare_database(engine: Engine) -> None:
    """Before the first connection: a SQLite file is created private (else SQLite makes it 0644, and its
    -wal and -shm files copy that mode)."""
    database = engine.url.database
    if engine.dialect.name == "sqlite" and database and database != ":memory:" and not database.startswith("file:"):
        with contextlib.suppress(FileNotFoundError):  # no folder: SQLite's own error will say so
            create_private_file(pathlib.Path(database))


def unbounded_statements(connection: Connection) -> None:
    """Lift the statement timeout for the rest of this connection's transaction (an export's query
    runs as long as the export); other connections keep theirs."""
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql("SET LOCAL statement_timeout = 0")


def export_reads(connection: Connection) -> None:
    """Set this transaction up for an export's reads: no statement timeout (see unbounded_statements),
    no idle-in-transaction timeout (the connection idles while ADBC's own reads), and, on
    PostgreSQL, no parallel plan and no JIT. Slices are the parallelism: each streams one
    range of the index in order, where a parallel plan would sort it (spilling to disk) and every
    query would first spend about 135 ms compiling its expressions. The backend shows as
    application_name EXPORT_APPLICATION_NAME in pg_stat_activity, so a DBA can tell export reads apart."""
    unbounded_statements(connection)
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f"SET LOCAL application_name = '{EXPORT_APPLICATION_NAME}'")
        connection.exec_driver_sql("SET LOCAL idle_in_transaction_session_timeout = 0")
        connection.exec_driver_sql("SET LOCAL max_parallel_workers_per_gather = 0")
        connection.exec_driver_sql("SET LOCAL jit = off")


@contextlib.contextmanager
def write_transaction(engine: Engine, lock_key: str | None = None) -> Iterator[Connection]:
    """A transaction that reads then writes without losing a race to a concurrent one.

    SQLite: BEGIN IMMEDIATE takes the write lock up front. PostgreSQL: rows are locked by the
    queries themselves; `lock_key` additionally serialises transactions on the same key (a tenant),
    for checks such as "at most N active jobs" that no row lock can cover. A transient fault is
    DatabaseUnavailable.
    """
    with translated(), engine.connect().execution_options(sqlite_immediate=True) as connection, \
            connection.begin():
        if lock_key is not None and connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": lock_key})
        yield connection


@contextlib.contextmanager
def reading(engine: Engine) -> Iterator[Connection]:
    """A connection for reads; a transient fault is DatabaseUnavailable."""
    with translated(), engine.connect() as connection:
        yield connection


def canceller(connection: Connection) -> Callable[[], None]:
    """A function that stops whatever `connection` runs now, from any thread, even when the database
    never answers (a hung or SIGSTOPped backend ignores a cancel request): SQLite's interrupt(), and
    on PostgreSQL a shutdown of the socket, which ends the blocked read at once; the connection is
    then invalid and the pool drops it."""
    driver: Any = connection.connection.driver_connection
    if connection.dialect.name == "sqlite":
        return driver.interrupt
    fd = driver.pgconn.socket

    def cancel() -> None:
        with contextlib.suppress(OSError), socket.socket(fileno=os.dup(fd)) as sock:
            sock.shutdown(socket.SHUT_RDWR)

    return cancel


def _sqlite_begin(connection: Connection) -> None:
    immediate = connection.get_execution_options().get("sqlite_immediate")
    connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any, *, busy_ms: int) -> None:
    # SQLAlchemy issues BEGIN itself (see _sqlite_begin), so pysqlite must not.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
    cursor.close()
