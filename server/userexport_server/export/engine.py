"""Run an export: stream the compiled query's lines through gzip into a storage writer.

The database renders every line (see sql.py), so the work left is reading rows and compressing,
and deflate is done by ISA-L (`isal`), about four times cheaper than zlib at a better ratio
(measured on the export's own CSV and NDJSON: 450-700 MB/s against 120-130 MB/s). The caller's
thread steps the database cursor (sqlite3 and psycopg release the GIL while the database works) and
joins lines into chunks; two threads deflate and checksum chunks in parallel (ISA-L releases the
GIL), pigz-style: each chunk is primed with the previous chunk's last 32 KiB and ends on a byte
boundary, so the pieces form one ordinary gzip member; one more thread writes them in order and
combines the chunks' CRCs, so the database thread does nothing but read and join. Lines arrive as
UTF-8 bytes, so Python never decodes or re-encodes them. Bounded queues keep memory flat whatever
the user count. The engine knows nothing of gRPC or jobs: it takes a connection, a spec and a
writer, and reports progress through a callback.
"""
from __future__ import annotations

import contextlib
import itertools
import queue
import struct
import threading
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

from isal import isal_zlib
from sqlalchemy import Connection
from sqlalchemy.sql.compiler import SQLCompiler

from userexport_server.errors import WorkStopped
from userexport_server.export.spec import ExportSpec
from userexport_server.export.sql import Chunks, ExportQuery, KeyRange, compile_export

# Compressed bytes are handed to the writer in pieces at least this big (fewer, larger uploads).
WRITE_BYTES = 256 * 1024
# Chunks being compressed or waiting to be written; with batch_rows lines each, this bounds memory.
IN_FLIGHT = 4
# Threads deflating chunks: with the database thread, enough to keep two cores busy.
DEFLATE_THREADS = 2
DEFAULT_BATCH_ROWS = 2000

_WINDOW = 32 * 1024  # deflate's window: how much of the previous chunk primes the next
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # deflate, no name, no mtime, unknown OS
_FINAL_BLOCK = b"\x03\x00"  # an empty last deflate block


def isal_level(gzip_level: int) -> int:
    """The service's gzip level 1-9 on ISA-L's 1-3: 1-3 -> 1, 4-6 -> 2, 7-9 -> 3 (ISA-L's 0 is
    left out: it compresses worse than zlib's 1 for no speed gained on this data)."""
    return min(3, max(1, (gzip_level + 2) // 3))


class ExportCancelled(WorkStopped):
    """progress() returned False; the export stopped and the caller should abort the writer."""


class Writer(Protocol):
    """What the engine needs of a storage writer (ObjectWriter has it)."""

    def write(self, data: bytes) -> None: ...


def run_export(
    conn: Connection,
    tenant: str,
    spec: ExportSpec,
    writer: Writer,
    *,
    progress: Callable[[int], bool] | None = None,
    gzip_level: int = 6,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    key_range: KeyRange | None = None,
) -> int:
    """Write `spec`'s export of `tenant` (or one `key_range` of it) to `writer` as one gzip member;
    return the users written. Only the first range (or the whole export) starts with the CSV header,
    so members of consecutive ranges concatenate into the whole export.

    `progress(users_written)` is called after every `batch_rows` users; returning False stops the
    export with ExportCancelled. A writer error is raised here, in the caller's thread. The
    writer is neither committed nor aborted: that is the caller's decision.
    """
    query = compile_export(spec, tenant, conn.dialect.name, key_range)
    end = query.line_end
    pipe = _GzipPipe(writer, gzip_level)
    written = 0
    try:
        if query.header is not None and (key_range is None or key_range.after is None):
            pipe.put(query.header + end)
        with contextlib.closing(_driver_chunks(conn, query, batch_rows)) as chunks:
            for chunk, rows in chunks:
                pipe.put(chunk)
                written += rows
                if progress is not None and not progress(written):
                    raise ExportCancelled(f"export cancelled after {written} users")
        pipe.finish()
    except BaseException:
        pipe.stop()
        raise
    return written


def _driver_chunks(conn: Connection, query: ExportQuery, size: int) -> Generator[tuple[bytes, int], None, None]:
    """The export's lines, each ending in the line end, in chunks of `size` users (with how many),
    straight from the driver, streaming on both databases.

    SQLAlchemy compiles the statement, but rows skip its Result layer: building a Row per user
    costs about a second per million, a tenth of the whole export. sqlite3 steps lazily. On
    PostgreSQL, psycopg's stream() (chunked rows mode) lets the server run ahead while Python
    compresses; a named cursor's FETCH round trips would leave the server idle half the time
    (measured: 10 s against 5 s for a million lines). Binary format makes the bytea lines raw bytes.
    A COPY's rows arrive as the buffers libpq received, each ending in a newline that is cut off
    here (slicing a memoryview copies nothing). Leaving early cancels the query, which would abort
    the caller's transaction: a savepoint around the stream keeps the connection usable. SQLite,
    which formats in this process, renders a whole chunk per step (ExportQuery.chunks).
    """
    end = query.line_end
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        if query.chunks is not None:
            yield from _chunks(cursor, conn, query, query.chunks, size)
            return
        sql, params = _bound(query.statement.compile(dialect=conn.dialect))
        if query.copy:
            with conn.begin_nested(), cursor.copy(sql, params) as copy:
                rows = iter(copy)
                while batch := list(itertools.islice(rows, size)):
                    yield end.join([row[:-1] for row in batch]) + end, len(batch)
        else:
            stream = cursor.stream(sql, params, binary=True, size=size)
            with conn.begin_nested(), contextlib.closing(stream) as rows:
                while batch := list(itertools.islice(rows, size)):
                    yield end.join([row[0] for row in batch]) + end, len(batch)
    finally:
        cursor.close()


def _chunks(cursor: Any, conn: Connection, query: ExportQuery, chunks: Chunks,
            size: int) -> Iterator[tuple[bytes, int]]:
    """Up to `size` users a step, each chunk continuing after the last user_id of the one before."""
    first, after = (statement.compile(dialect=conn.dialect) for statement in (query.statement, chunks.after))
    remaining, last = chunks.limit, None
    while remaining is None or remaining > 0:
        take = size if remaining is None else min(size, remaining)
        compiled = first if last is None else after
        lines, last, rows = cursor.execute(*_bound(compiled, chunk=take, cursor=last)).fetchone()
        if rows:
            yield lines + query.line_end, rows
        if rows < take:
            return
        if remaining is not None:
            remaining -= rows


def _bound(compiled: SQLCompiler, **values: Any) -> tuple[str, Any]:
    """The driver's SQL and parameters of a compiled statement, with `values` bound over its own."""
    params: Any = compiled.construct_params(values or None)
    if compiled.positional:
        params = tuple(params[name] for name in compiled.positiontup or ())
    return compiled.string, params


def _deflate(chunk: bytes, level: int, primer: bytes) -> tuple[bytes, int]:
    """Raw deflate of one chunk, primed with what came before, ending on a byte boundary (sync
    flush) so that pieces compressed apart concatenate into one deflate stream; and its CRC-32."""
    compressor = isal_zlib.compressobj(level, isal_zlib.DEFLATED, -15, zdict=primer)
    return compressor.compress(chunk) + compressor.flush(isal_zlib.Z_SYNC_FLUSH), isal_zlib.crc32(chunk)


class _GzipPipe:
    """Chunks in, one gzip stream out to the writer; errors surface on the producer's side."""

    def __init__(self, writer: Writer, level: int) -> None:
        self._writer, self._level = writer, isal_level(level)
        self._primer = b""
        self._pool = ThreadPoolExecutor(DEFLATE_THREADS, thread_name_prefix="export-deflate")
        self._queue: queue.Queue[tuple[Future[tuple[bytes, int]], int] | None] = queue.Queue(maxsize=IN_FLIGHT)
        self._error: BaseException | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._write_in_order, name="export-write", daemon=True)
        self._thread.start()

    def put(self, chunk: bytes) -> None:
        """Start compressing a chunk, waiting while too many are in flight; raise the writer's error."""
        self._raise_error()
        future = self._pool.submit(_deflate, chunk, self._level, self._primer)
        self._primer = chunk[-_WINDOW:] if len(chunk) >= _WINDOW else (self._primer + chunk)[-_WINDOW:]
        self._enqueue((future, len(chunk)))

    def finish(self) -> None:
        """Write the rest and the gzip trailer, and wait for it; raise the writer's error if any."""
        self._enqueue(None)
        self._thread.join()
        self._pool.shutdown()
        self._raise_error()

    def stop(self) -> None:
        """Abandon the stream: drop what is queued and wait until no thread touches the writer."""
        self._stopping = True
        while True:
            try:
                future = self._queue.get_nowait()
            except queue.Empty:
                break
            if future is not None:
                future[0].cancel()
        self._queue.put_nowait(None)  # room is certain: this thread is the only producer
        self._thread.join()
        self._pool.shutdown(cancel_futures=True)

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _enqueue(self, item: tuple[Future[tuple[bytes, int]], int] | None) -> None:
        while True:
            self._raise_error()
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _write_in_order(self) -> None:
        pending, size = [_GZIP_HEADER], len(_GZIP_HEADER)
        crc = total = 0
        try:
            while (item := self._queue.get()) is not None and not self._stopping:
                data, chunk_crc = item[0].result()
                crc, total = isal_zlib.crc32_combine(crc, chunk_crc, item[1]), total + item[1]
                pending.append(data)
                size += len(data)
                if size >= WRITE_BYTES:
                    self._writer.write(b"".join(pending))
                    pending, size = [], 0
            if not self._stopping:
                pending += [_FINAL_BLOCK, struct.pack("<II", crc, total & 0xFFFFFFFF)]
                self._writer.write(b"".join(pending))
        except BaseException as error:  # handed to the producer thread, which re-raises it
            self._error = error
