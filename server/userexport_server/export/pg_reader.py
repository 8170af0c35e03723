"""PostgreSQL's reader (reader.py): ADBC's driver streams the query as a binary COPY and decodes it
into Arrow record batches in C (measured against psycopg's text COPY into pyarrow's CSV reader: see
docs/benchmarks.md). A JSON path's value is taken from its root's stored text here, in C
(json_path.py), not by the database. It needs its own connection; that connection takes the
caller's export settings (export_reads: no statement timeout, no parallel plan, no JIT) from the
caller's connection, so it honours whatever that function sets, and `backend_pid` names it for an
operator or a canceller. ADBC's errors become psycopg's OperationalError, which db/faults.py knows,
so a terminated connection is retried as before.
"""
from __future__ import annotations

import contextlib
import os
import socket
import struct
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import psycopg
import pyarrow as pa
from sqlalchemy import Connection, text

from userexport_server.db.engine import KEEPALIVES
from userexport_server.export.json_path import values_at
from userexport_server.export.reader import ColumnReader
from userexport_server.export.sql import Projection


def _adbc_without_polars() -> tuple[Any, Any]:
    """ADBC's DB-API modules (the manager's, the PostgreSQL driver's), imported without polars: the
    manager imports polars whenever it is installed (for polars bind parameters, never used here),
    which cost a PostgreSQL server 24 MB of RSS for a library none of its exports touches. Where
    polars is loaded already, it is left as it is."""
    hidden = "polars" not in sys.modules
    if hidden:
        sys.modules["polars"] = None  # type: ignore[assignment]  # so `import polars` raises ImportError
    try:
        import adbc_driver_manager.dbapi
        import adbc_driver_postgresql.dbapi
    finally:
        if hidden:
            del sys.modules["polars"]
    return adbc_driver_manager.dbapi, adbc_driver_postgresql.dbapi


adbc, adbc_postgresql = _adbc_without_polars()

# Bytes of rows per batch (the driver's hint): big enough that per-batch costs vanish, small
# enough that two exports stay far below the memory goal.
PG_BATCH_BYTES = 1024 * 1024
# The export_reads settings the ADBC connection copies from the caller's (application_name: so
# pg_stat_activity shows its backend as an export read, as it showed the caller's).
_MIRRORED = ("statement_timeout", "max_parallel_workers_per_gather", "jit", "application_name")
# SO_LINGER on, 0 s: the socket's last close resets the connection instead of closing it in order.
_ABORTIVE = struct.pack("ii", 1, 0)
T = TypeVar("T")


class PostgresReader(ColumnReader):
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
        self._adbc = _pg_errors(lambda: adbc_postgresql.connect(uri, autocommit=True))
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
