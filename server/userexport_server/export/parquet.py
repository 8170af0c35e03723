"""Parquet exports: the same typed columns, written as Parquet instead of text.

Each field is one column named by its title (export_as, else the field name): strings, booleans,
int64 and timestamps in milliseconds, UTC-adjusted (truncated, like the text formats); a JSON path's
value is its JSON text as stored, with Parquet's JSON logical type, and a JSON null is null. zstd.

A slice writes a whole Parquet file of its own (its part): row groups of up to ROW_GROUP_BYTES of
column data, so a slice of the default 100,000 users is one row group for the CSV-like fields and a
few for whole profiles, without holding more than that in memory. Parts cannot be concatenated like
gzip members: `assemble_parquet` streams them into one file, a row group at a time, keeping every
part's row groups as they are (and their order), and returns the file's rows.
"""
from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Sequence
from typing import BinaryIO

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from userexport_server.export.paths import Kind
from userexport_server.export.spec import ExportSpec
from userexport_server.export.sql import OP_FIELD, Column

ROW_GROUP_BYTES = 32 * 1024 * 1024
COMPRESSION = "zstd"
_ARROW_TYPES = {Kind.STRING: pa.large_string(), Kind.BOOL: pa.bool_(), Kind.INT: pa.int64(),
                Kind.DATETIME: pa.timestamp("ms", tz="UTC"), Kind.JSON: pa.json_(pa.large_string())}


class ParquetColumns:
    """The Parquet columns of one spec: its Arrow schema, and a frame (reader.py) made a table of it;
    `op`: an incremental export's `_op` column comes first."""

    def __init__(self, spec: ExportSpec, columns: Sequence[Column], fields: Sequence[int | None],
                 op: bool = False) -> None:
        kinds = [None if i is None else columns[i].kind for i in fields]
        self.schema = pa.schema([pa.field(OP_FIELD, pa.large_string())] * op +
                                [pa.field(f.title, _ARROW_TYPES[kind or Kind.STRING])
                                 for f, kind in zip(spec.fields, kinds)])
        self._exprs = [pl.col("op").alias("f_op")] * op + [
            _value(None if i is None else pl.col(f"c{i}"), kind).alias(f"f{n}")
            for n, (i, kind) in enumerate(zip(fields, kinds))]
        self._names = [e.meta.output_name() for e in self._exprs]

    def table(self, frame: pl.DataFrame) -> pa.Table:
        """The frame's users as a table of the schema (with_columns: a field no user has spans every row)."""
        arrays = frame.with_columns(self._exprs).select(self._names).to_arrow().columns
        return pa.Table.from_arrays([_typed(a, f.type) for a, f in zip(arrays, self.schema)], schema=self.schema)


def _value(value: pl.Expr | None, kind: Kind | None) -> pl.Expr:
    """A field's column before it becomes Arrow: dates floored to milliseconds, JSON null as null."""
    if value is None or kind is None:
        return pl.lit(None, pl.String)
    if kind is Kind.DATETIME:
        return pl.from_epoch(value.dt.epoch("us") // 1000, time_unit="ms").dt.replace_time_zone("UTC")
    if kind is Kind.JSON:
        return pl.when(value != "null").then(value)
    return value


def _typed(array: pa.ChunkedArray, type: pa.DataType) -> pa.ChunkedArray:
    if isinstance(type, pa.ExtensionType):
        storage = array.cast(type.storage_type)
        return pa.chunked_array([pa.ExtensionArray.from_storage(type, chunk) for chunk in storage.chunks], type)
    return array.cast(type)


class _Sink(io.RawIOBase):
    """A storage writer as the file Parquet's writer needs: write and tell."""

    def __init__(self, write: Callable[[bytes], object]) -> None:
        self._write, self._position = write, 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self._write(bytes(data))
        self._position += len(data)
        return len(data)

    def tell(self) -> int:
        return self._position


class ParquetStream:
    """Tables in, one Parquet file out through `write`: a row group whenever ROW_GROUP_BYTES of
    tables are pending, and the rest with the footer at close()."""

    def __init__(self, schema: pa.Schema, write: Callable[[bytes], object]) -> None:
        self._writer = pq.ParquetWriter(_Sink(write), schema, compression=COMPRESSION)
        self._pending: list[pa.Table] = []
        self._size = 0

    def write(self, table: pa.Table) -> None:
        """Add rows to the pending row group, written once it is big enough."""
        self._pending.append(table)
        self._size += table.nbytes
        if self._size >= ROW_GROUP_BYTES:
            self._flush()

    def write_row_group(self, table: pa.Table) -> None:
        """Write `table` as one row group (after what is pending)."""
        self._flush()
        self._writer.write_table(table, row_group_size=max(1, table.num_rows))

    def close(self) -> None:
        """Write the pending row group and the footer."""
        self._flush()
        self._writer.close()

    def _flush(self) -> None:
        if self._pending:
            table = pa.concat_tables(self._pending)
            self._pending, self._size = [], 0
            self._writer.write_table(table, row_group_size=max(1, table.num_rows))


def assemble_parquet(parts: Iterable[BinaryIO], write: Callable[[bytes], object]) -> int:
    """Stream the Parquet files `parts` (a job's slices, in key order; at least one) into one file
    through `write`, each row group copied as a row group of its own; return the rows written. It
    holds one row group at a time."""
    stream: ParquetStream | None = None
    rows = 0
    for part in parts:
        reader = pq.ParquetFile(part)
        if stream is None:
            stream = ParquetStream(reader.schema_arrow, write)
        for i in range(reader.num_row_groups):
            table = reader.read_row_group(i)
            stream.write_row_group(table)
            rows += table.num_rows
    if stream is None:
        raise ValueError("a Parquet export has at least one part")
    stream.close()
    return rows
