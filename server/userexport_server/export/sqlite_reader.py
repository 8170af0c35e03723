"""SQLite's reader (reader.py): through the caller's own connection (Python's sqlite3, the library
SQLAlchemy uses). ADBC's SQLite driver carries its own copy of SQLite, and two copies in one
process break each other's POSIX locks on the same file (https://sqlite.org/howtocorrupt.html,
2.2.1): measured here, the next sqlite3 connection failed with "disk I/O error". A chunk of users
comes back as one row of JSON object lines (sql.Chunks), which polars parses in one call with the
column types given.
"""
from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from typing import Any

import polars as pl
import pyarrow as pa
from sqlalchemy import Connection
from sqlalchemy.sql.compiler import SQLCompiler

from userexport_server.export.paths import Kind
from userexport_server.export.reader import ColumnReader
from userexport_server.export.sql import Chunks, Projection

SQLITE_CHUNK_ROWS = 2000  # users a chunk: big enough that per-chunk costs vanish
_DATE_TEXT = "%Y-%m-%d %H:%M:%S%.f"  # SQLAlchemy's DateTime text on SQLite (UTC by convention)
# How SQLite's JSON lines carry each kind (booleans are stored as 0/1, dates as text).
_SQLITE_TYPES = {Kind.STRING: pl.String, Kind.JSON: pl.String, Kind.DATETIME: pl.String, Kind.INT: pl.Int64,
                 Kind.BOOL: pl.Int64}


class SqliteReader(ColumnReader):
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
