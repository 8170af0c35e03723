"""Engine creation: one place that knows SQLite's and PostgreSQL's connection quirks."""
from __future__ import annotations

import contextlib
import functools
import pathlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import Connection, Engine, create_engine, event, text

from userexport_server.private_files import create_private_file


def _compact_json(value: Any) -> str:
    """Compact JSON text, so exports can copy stored JSON to the file unchanged."""
    return orjson.dumps(value).decode()


@dataclass(frozen=True, slots=True)
class Timeouts:
    """How long one database call may wait, so a stalled database turns into an error, not a hang.

    `busy`: SQLite waiting for another writer's lock. `statement`: PostgreSQL running one statement
    (exports lift it, see `unbounded_statements`). `pool`: waiting for a free pooled connection.
    `connect`: opening a PostgreSQL connection.
    """

    busy: float = 5.0
    statement: float = 30.0
    pool: float = 10.0
    connect: float = 5.0


def make_engine(url: str, timeouts: Timeouts = Timeouts(), **kwargs: Any) -> Engine:
    """An engine for `url`; SQLite gets WAL, a busy timeout and foreign keys so threads can share it."""
    if url.startswith("postgresql") and "+" not in url.split("://", 1)[0]:
        url = url.replace("postgresql", "postgresql+psycopg", 1)
    is_sqlite = url.startswith("sqlite")
    options: dict[str, Any] = {"json_serializer": _compact_json, "json_deserializer": orjson.loads}
    if is_sqlite:
        options["connect_args"] = {"check_same_thread": False, "timeout": timeouts.busy}
    else:
        options.update(pool_pre_ping=True, pool_size=10, max_overflow=20, pool_timeout=timeouts.pool, connect_args={
            "connect_timeout": max(1, round(timeouts.connect)),
            "options": f"-c statement_timeout={round(timeouts.statement * 1000)}",
        })
    options.update(kwargs)
    engine = create_engine(url, **options)
    if is_sqlite:
        database = engine.url.database
        if database and database != ":memory:" and not database.startswith("file:"):
            with contextlib.suppress(FileNotFoundError):  # no folder: SQLite's own error will say so
                create_private_file(pathlib.Path(database))  # else SQLite makes it 0644; -wal/-shm copy its mode
        event.listen(engine, "connect", functools.partial(_sqlite_pragmas, busy_ms=round(timeouts.busy * 1000)))
        event.listen(engine, "begin", _sqlite_begin)
    return engine


def unbounded_statements(connection: Connection) -> None:
    """Lift the statement timeout for the rest of this connection's transaction (an export's query
    runs as long as the export); other connections keep theirs."""
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql("SET LOCAL statement_timeout = 0")


def export_reads(connection: Connection) -> None:
    """Set this transaction up for an export's reads: no statement timeout (see unbounded_statements)
    and, on PostgreSQL, no parallel plan and no JIT. Slices are the parallelism: each streams one
    range of the index in order, where a parallel plan would sort it (spilling to disk) and every
    query would first spend about 135 ms compiling its expressions."""
    unbounded_statements(connection)
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql("SET LOCAL max_parallel_workers_per_gather = 0")
        connection.exec_driver_sql("SET LOCAL jit = off")


@contextlib.contextmanager
def write_transaction(engine: Engine, lock_key: str | None = None) -> Iterator[Connection]:
    """A transaction that reads then writes without losing a race to a concurrent one.

    SQLite: BEGIN IMMEDIATE takes the write lock up front. PostgreSQL: rows are locked by the
    queries themselves; `lock_key` additionally serialises transactions on the same key (a tenant),
    for checks such as "at most N active jobs" that no row lock can cover.
    """
    with engine.connect().execution_options(sqlite_immediate=True) as connection, connection.begin():
        if lock_key is not None and connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": lock_key})
        yield connection


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
