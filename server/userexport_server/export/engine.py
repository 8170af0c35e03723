"""Run an export: typed columns from the database, cells formatted in columns, gzip, the writer.

The database returns the projection's typed columns (sql.py), read in batches without Python per
row (reader.py); cells.py formats a whole batch's cells at once in native code; ISA-L deflates on its own
threads (`isal.igzip_threaded`, pigz-style: two threads compress blocks primed with the previous
block's last 32 KiB into one gzip member, a third writes them in order). A Parquet export writes
the typed columns instead (parquet.py). Python never loops per row: per batch it makes a few calls
into native code. Bounded batches and queues keep memory flat
whatever the user count. The engine knows nothing of gRPC or jobs: it takes a connection, a spec
and a writer, and reports progress through a callback.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Protocol

import pyarrow as pa
from isal import igzip_threaded
from sqlalchemy import Connection

from userexport_server.errors import WorkStopped
from userexport_server.export.cells import Formatter
from userexport_server.export.parquet import ParquetColumns, ParquetStream
from userexport_server.export.reader import ColumnReader, open_reader
from userexport_server.export.spec import ExportSpec, Format
from userexport_server.export.sql import KeyRange, Projection, projection

# Compressed bytes are handed to the writer in pieces at least this big (fewer, larger uploads).
WRITE_BYTES = 256 * 1024
# Threads deflating blocks; with the reading and formatting thread, enough to keep two cores busy.
DEFLATE_THREADS = 2
DEFLATE_BLOCK = 512 * 1024  # bytes per deflated block (half igzip_threaded's default: memory)
DEFAULT_BATCH_ROWS = 2000


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
    on_query: Callable[[ColumnReader], None] | None = None,
) -> int:
    """Write `spec`'s export of `tenant` (or one `key_range` of it) to `writer` as one gzip member
    (Parquet: one whole file, see parquet.assemble_parquet); return the users written. Only the
    first range (or the whole export) starts with the CSV header, so members of consecutive ranges
    concatenate into the whole export.

    `progress(users_written)` is called at every multiple of `batch_rows` users and at the end;
    returning False stops the export with ExportCancelled. `on_query(reader)` is called once the
    query runs, with the reader whose `cancel()` stops it (and, on PostgreSQL, its `backend_pid`).
    A writer error is raised here, in the caller's thread. The writer is neither committed nor
    aborted: that is the caller's decision.
    """
    query = projection(spec, tenant, conn.dialect.name, key_range)
    sink = _Coalesced(writer)
    written = 0
    with contextlib.closing(open_reader(conn, query)) as reader, _output(spec, query, sink, gzip_level) as out:
        if on_query is not None:
            on_query(reader)
        if key_range is None or key_range.after is None:
            out.start()
        for batch in reader:
            out.write(batch)
            before, written = written, written + batch.num_rows
            for reached in range(before - before % batch_rows + batch_rows, written + 1, batch_rows):
                _report(progress, reached)
        if written % batch_rows:
            _report(progress, written)
        out.finish()
    sink.drain()
    return written


def _report(progress: Callable[[int], bool] | None, written: int) -> None:
    if progress is not None and not progress(written):
        raise ExportCancelled(f"export cancelled after {written} users")


class _Coalesced:
    """The storage writer behind the output: writes of at least WRITE_BYTES (the last may be
    smaller), and none at all once the output is abandoned."""

    def __init__(self, writer: Writer) -> None:
        self._writer = writer
        self._pending: list[bytes] = []
        self._size = 0
        self.abandoned = False

    def write(self, data: bytes) -> int:
        """Keep `data` for the writer (nothing once abandoned); hand it over once there is enough."""
        if not self.abandoned:
            self._pending.append(bytes(data))
            self._size += len(data)
            if self._size >= WRITE_BYTES:
                self.drain()
        return len(data)

    def flush(self) -> None:
        """Nothing: igzip flushes before its trailer, which would make a small write; run_export
        drains the rest once the output is finished."""

    def drain(self) -> None:
        """Hand what is pending to the writer."""
        if self._pending and not self.abandoned:
            self._writer.write(b"".join(self._pending))
        self._pending, self._size = [], 0


class _Output(Protocol):
    """Batches in, a file out: `start()` writes what only a whole export's first part begins with,
    `finish()` the end; leaving the block without finish() abandons it (the sink takes nothing more)."""

    def __enter__(self) -> _Output: ...
    def __exit__(self, *exc: object) -> None: ...
    def start(self) -> None: ...
    def write(self, batch: pa.RecordBatch) -> None: ...
    def finish(self) -> None: ...


def _output(spec: ExportSpec, query: Projection, sink: _Coalesced, gzip_level: int) -> _Output:
    if spec.format is Format.PARQUET:
        return _ParquetOutput(ParquetColumns(spec, query.columns, query.fields, query.op), sink)
    return _TextOutput(Formatter(spec, query.columns, query.fields, query.op), sink, gzip_level)


class _ParquetOutput:
    """A slice's Parquet file (see parquet.py); every part is a whole file, so start() adds nothing."""

    def __init__(self, columns: ParquetColumns, sink: _Coalesced) -> None:
        self._columns, self._sink = columns, sink
        self._stream = ParquetStream(columns.schema, sink.write)
        self._finished = False

    def __enter__(self) -> _ParquetOutput:
        return self

    def start(self) -> None:
        pass

    def write(self, batch: pa.RecordBatch) -> None:
        self._stream.write(self._columns.table(batch))

    def finish(self) -> None:
        self._stream.close()
        self._finished = True

    def __exit__(self, *exc: object) -> None:
        if not self._finished:
            self._sink.abandoned = True
            with contextlib.suppress(Exception):  # the error that got us here is the one to raise
                self._stream.close()


class _TextOutput:
    """CSV or NDJSON lines through one gzip member; the CSV header starts the whole export."""

    def __init__(self, formatter: Formatter, sink: _Coalesced, gzip_level: int) -> None:
        self._formatter, self._gzip = formatter, _GzipStream(sink, gzip_level)

    def __enter__(self) -> _TextOutput:
        return self

    def start(self) -> None:
        if self._formatter.header is not None:
            self._gzip.write(self._formatter.header + self._formatter.line_end)

    def write(self, batch: pa.RecordBatch) -> None:
        self._gzip.write(self._formatter.render(batch))

    def finish(self) -> None:
        self._gzip.finish()

    def __exit__(self, *exc: object) -> None:
        self._gzip.__exit__(*exc)


class _GzipStream:
    """Text in, one gzip member out to the writer; its errors surface at the next write or finish.
    Leaving the block without finish() abandons the stream: no further byte reaches the writer."""

    def __init__(self, sink: _Coalesced, level: int) -> None:
        self._sink = sink
        self._gzip = igzip_threaded.open(self._sink, "wb", compresslevel=isal_level(level), threads=DEFLATE_THREADS,
                                         block_size=DEFLATE_BLOCK)
        self._finished = False

    def __enter__(self) -> _GzipStream:
        return self

    def write(self, data: bytes | memoryview) -> None:
        self._gzip.write(data)

    def finish(self) -> None:
        """Deflate the rest and write the trailer; raise the writer's error if any."""
        self._gzip.close()
        self._finished = True

    def __exit__(self, *exc: object) -> None:
        if not self._finished:
            self._sink.abandoned = True
            with contextlib.suppress(Exception):  # the error that got us here is the one to raise
                self._gzip.close()  # stops the threads; what they still write goes nowhere
