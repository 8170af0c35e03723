"""Read a projection (sql.py) from either database into Arrow record batches of typed columns, in
bounded batches, with no Python per row: native code decodes every batch (pg_reader.py,
sqlite_reader.py).

Every batch has the projection's columns c0..cn, one type per kind: STRING and JSON (the value's
JSON text) as a string or large_string, INT as int64, BOOL as bool, DATETIME as timestamp[us] in
UTC; a missing value is null; an incremental export's batches also have `op` (a string).
`cancel()` (any thread) stops the running query, and does nothing once the reader is closed.

Each database's reader is imported when first opened: a PostgreSQL server never loads polars,
which only the SQLite reader uses (about 45 MB of a server's RSS), nor a SQLite server ADBC.
"""
from __future__ import annotations

import abc
from collections.abc import Iterator

import pyarrow as pa
from sqlalchemy import Connection

from userexport_server.export.sql import Projection


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
        from userexport_server.export.sqlite_reader import SqliteReader

        return SqliteReader(conn, projection, projection.chunks)
    from userexport_server.export.pg_reader import PostgresReader

    return PostgresReader(conn, projection)
