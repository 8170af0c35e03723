"""Read a projection (sql.py) from either database into Arrow record batches of typed columns, in
bounded batches, with no Python per row: native code decodes every batch.

PostgreSQL: ADBC's driver streams the query as a binary COPY and decodes it into Arrow record
batches in C (measured against psycopg's text COPY into pyarrow's CSV reader: see the README). It
needs its own connection; that connection takes the caller's export settings (export_reads: no
statement timeout, no parallel plan, no JIT) from the caller's connection, so it honours whatever
that function sets, and `backend_pid` names it for an operator or a canceller.

SQLite: through the caller's own connection (Python's sqlite3, the library SQLAlchemy uses). ADBC's
SQLite driver carries its own copy of SQLite, and two copies in one process break each other's
POSIX locks on the same file (https://sqlite.org/howtocorrupt.html, 2.2.1): measured here, the
next sqlite3 connection failed with "disk I/O error". A chunk of users comes back as one row of
JSON object lines (sql.Chunks), which polars parses in one call with the column types given.

Every batch has the projection's columns c0..cn, one type per kind: STRING and JSON (the value's
JSON text) as a string or large_string, INT as int64, BOOL as bool, DATETIME as timestamp[us] in
UTC; a missing value is null; an incremental export's batches also have `op` (a string). `cancel()` (any thread)
stops the running query, and does nothing once the reader is closed; ADBC's errors become psycopg's
OperationalError, which db/faults.py knows, so a terminated connection is retried as before.
"""
from __future__ import annotations

import abc
import contextlib
import io
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import adbc_driver_postgresql.dbapi
import polars as pl
import psycopg
import pyarrow as pa
from adbc_driver_manager import dbapi as adbc
from sqlalchemy import Connection, text
from sqlalchemy.sql.compiler import SQLCompiler

from userexport_server.db.engine import KEEPALIVES
from userexport_server.export.json_path import values_at
from userexport_server.export.paths import Kind
from userexport_server.export.sql import Chunks, Projection

# Bytes of rows per PostgreSQL batch (the driver's hint) and users per SQLite chunk: big enough
# that per-batch costs vanish, small enough that two exports stay far below the memory goal.
PG_BATCH_BYTES = 1024 * 1024
SQLITE_CHUNK_ROWS = 2000
# The export_reads settings the ADBC connection copies from the caller's (application_name: so
# pg_stat_activity shows its backend as an export read, as it showed the caller's).
_MIRRORED = ("statement_timeout", "max_parallel_workers_per_gather", "jit", "application_name")
# SO_LINGER on, 0 s: the socket's last close resets the connection instead of closing it in order.
_ABORTIVE = struct.pack("ii", 1, 0)
_DATE_TEXT = "%Y-%m-%d %H:%M:%S%.f"  # SQLAlchemy's DateTime text on SQLite (UTC by convention)
# How SQLite's JSON lines carry each kind (booleans are stored as 0/1, dates as text).
_SQLITE_TYPES = {Kind.STRING: pl.String, Kind.JSON: pl.String, Kind.DATETIME: pl.String, Kind.INT: pl.Int64,
                 Kind.BOOL: pl.Int64}
T = TypeVar("T")


class ColumnReader(abc.ABC):
    """One export query: iterate for batches, `cancel()` from any thread, `close()` when done."""

    backend_pid: int | None = None  # PostgreSQL: the backend running the query

    @abc.abstractmethod
    def __iter__(self) -> Iterator[pa.RecordBatch]: ...

    @abc.abstractmethod
    def cancel(self) -> None:
        """Stop the running query (any thread; nothing once closed); iterating then raises."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop what is left of the query and release what the reader holds."""


def open_reader(conn: Connection, projection: Projection) -> ColumnReader:
    """The reader of `projection` for `conn`'s database."""
    if projection.chunks is not None:
        return _SqliteReader(conn, projection, projection.chunks)
    return _PostgresReader(conn, projection)


class _PostgresReader(ColumnReader):
    """ADBC's binary COPY on a connection of its own. Whoever may have to stop the read (a worker's
    run: a cancel, a stall, shutdown) registers `cancel` (run_export's on_query); the caller's own
    connection sits idle meanwhile."""

    def __init__(self, conn: Connection, projection: Projection) -> None:
        # The columns whose JSON root's text arrives (sql.py) and the path to take from it.
        self._paths = {f"c{i}": c.path for i, c in enumerate(projection.columns) if c.path is not None}
        driver: Any = conn.connection.driver_connection
        mogrify = psycopg.ClientCursor(driver).mogrify
        compiled = projection.statement.compile(dialect=conn.dialect)
        self._query = mogrify(compiled.string, compiled.construct_params())
        current = conn.execute(text("SELECT " + ", ".join(f"current_setting('{name}')" for name in _MIRRORED))).one()
        apply = ", ".join(f"set_config('{name}', %s, false)" for name in _MIRRORED)
        url = conn.engine.url.set(drivername="postgresql").update_query_dict(
            {k: str(v) for k, v in KEEPALIVES.items()})
        uri = url.render_as_string(hide_password=False)
        self._adbc = _pg_errors(lambda: adbc_driver_postgresql.dbapi.connect(uri, autocommit=True))
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()  # cancel() and close() from different threads
        self._closed = False
        try:
            self._cursor = self._adbc.cursor()
            self._cursor.execute(mogrify(f"SELECT {apply}, pg_backend_pid(), inet_client_port()", tuple(current)))
            *_, pid, port = self._cursor.fetchone()
            self.backend_pid = int(pid)
            self._socket = _tcp_socket(port)
        except BaseException:
            self._adbc.close()
            raise

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        self._cursor.adbc_statement.set_options(**{"adbc.postgresql.batch_size_hint_bytes": str(PG_BATCH_BYTES)})
        _pg_errors(lambda: self._cursor.execute(self._query))
        batches = _pg_errors(self._cursor.fetch_record_batch)
        while (batch := _pg_errors(lambda: next(batches, None))) is not None:
            arrays = [a.storage if isinstance(a, pa.ExtensionArray) else a for a in batch.columns]  # json: text
            yield pa.RecordBatch.from_arrays([self._typed(a, name) for a, name in zip(arrays, batch.schema.names)],
                                             names=batch.schema.names)

    def _typed(self, array: pa.Array, name: str) -> pa.Array:
        """A column of the batch as its kind's type: a path's value taken from its root's text; an
        int4 as int64."""
        if name in self._paths:
            return values_at(array, self._paths[name])
        return array.cast(pa.int64()) if pa.types.is_integer(array.type) else array

    def cancel(self) -> None:
        """Ask the server to cancel, and shut the socket down, which ends a read the server will
        never answer (a hung backend ignores a cancel request) at once; iterating then raises.

        The socket is also made to reset the connection when it is closed. A backend blocked
        sending rows (ClientWrite) serves no cancel request, and closed in order our socket was
        left in FIN_WAIT2 with nothing unread, so no reset went out until the backend's window
        probes drew one, 10-30 s later (3 cancels in 8, tests/export/test_reader.py); a reset
        frees it at once."""
        with self._lock:
            if self._closed:
                return
            with contextlib.suppress(adbc.Error):
                self._cursor.adbc_cancel()
            if self._socket is not None:
                with contextlib.suppress(OSError):
                    self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _ABORTIVE)
                    self._socket.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            try:
                with contextlib.suppress(adbc.Error):
                    self._cursor.adbc_cancel()  # else closing mid-COPY would read the rest of it
                self._cursor.close()
            finally:
                self._adbc.close()
                if self._socket is not None:
                    self._socket.close()


def _tcp_socket(port: int | None) -> socket.socket | None:
    """This process's TCP socket whose local port is `port` (the ADBC connection's, as the server
    sees it), duplicated; None for a Unix-socket connection or when /proc does not say (then
    cancel() is a cancel request alone)."""
    if port is None:
        return None
    inodes = set()
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as lines:
            for line in lines.readlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{fields[9]}]")
    with contextlib.suppress(OSError):
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/self/fd/{fd}") in inodes:
                    return socket.socket(fileno=os.dup(int(fd)))
    return None


def _pg_errors(call: Callable[[], T]) -> T:
    """`call()`, with ADBC's failures of a running read (its connection terminated, the query
    cancelled, the server gone) raised as psycopg's OperationalError, which db/faults.py retries;
    a statement the server refuses (ProgrammingError) stays what it is."""
    try:
        return call()
    except adbc.ProgrammingError:
        raise
    except (adbc.Error, OSError) as error:  # pyarrow raises a failed stream's error as OSError
        raise psycopg.OperationalError(str(error)) from error


class _SqliteReader(ColumnReader):
    def __init__(self, conn: Connection, projection: Projection, chunks: Chunks) -> None:
        self._driver = conn.connection.driver_connection
        self._cursor = self._driver.cursor()  # type: ignore[union-attr]
        self._lock = threading.Lock()
        self._closed = False
        self._first, self._after = (s.compile(dialect=conn.dialect) for s in (projection.statement, chunks.after))
        self._limit = chunks.limit
        columns = projection.columns
        self._schema = ({"op": pl.String} if projection.op else {}) | \
            {f"c{i}": _SQLITE_TYPES[c.kind] for i, c in enumerate(columns)} or {"c": pl.Int64}
        self._typed = [_sqlite_typed(pl.col(f"c{i}"), c.kind).alias(f"c{i}") for i, c in enumerate(columns)]

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        """Up to SQLITE_CHUNK_ROWS users a step, each chunk after the last user_id of the one before."""
        remaining, last = self._limit, None
        while remaining is None or remaining > 0:
            take = SQLITE_CHUNK_ROWS if remaining is None else min(SQLITE_CHUNK_ROWS, remaining)
            compiled = self._first if last is None else self._after
            lines, last, rows = self._cursor.execute(*_bound(compiled, chunk=take, cursor=last)).fetchone()
            if rows:
                # One batch a chunk: polars parses in pieces, and batches of a few dozen users would
                # cost every later step its per-batch work hundreds of times over.
                yield from pl.read_ndjson(io.BytesIO(lines), schema=self._schema).with_columns(self._typed) \
                    .rechunk().to_arrow().to_batches()
            if rows < take:
                return
            if remaining is not None:
                remaining -= rows

    def cancel(self) -> None:
        with self._lock:  # once closed, the connection is the caller's again: never interrupt it then
            if not self._closed:
                self._driver.interrupt()  # type: ignore[union-attr]

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._cursor.close()


def _sqlite_typed(value: pl.Expr, kind: Kind) -> pl.Expr:
    """A column of SQLite's JSON lines as its kind's type."""
    match kind:
        case Kind.BOOL:
            return pl.when(value == 1).then(True).when(value == 0).then(False)
        case Kind.DATETIME:
            return value.str.to_datetime(_DATE_TEXT, time_unit="us", time_zone="UTC", strict=False)
    return value


def _bound(compiled: SQLCompiler, **values: Any) -> tuple[str, Any]:
    """The driver's SQL and parameters of a compiled statement, with `values` bound over its own."""
    params: Any = compiled.construct_params(values)
    if compiled.positional:
        params = tuple(params[name] for name in compiled.positiontup or ())
    return compiled.string, params

