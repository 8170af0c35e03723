"""Parquet exports: the same typed columns, written as Parquet instead of text.

Each field is one column named by its title (export_as, else the field name): strings, booleans,
int64 and timestamps in milliseconds, UTC-adjusted (truncated, like the text formats); a JSON path's
value is its JSON text as stored, with Parquet's JSON logical type, and a JSON null is null. zstd.

A slice writes a whole Parquet file of its own (its part): row groups of ROW_GROUP_BYTES of Arrow
column data (about 13,000 whole profiles, 24,000 users of the CSV fields), held until written. The
size is memory's: a slice's export peaks at about 2.4x what it holds on top of the Parquet writer's
own, so 32 MiB groups took a 2-worker server from 178 MB idle to 409 MB (300,000 users on
PostgreSQL) and 8 MiB to 290 MB, for files 4% larger; 4 MiB saves only 4 MB more.

Parts cannot be concatenated like gzip members, and decoding them to write them again would cost the
assembler as much as the slices' own writing. Instead the job's file is the parts laid end to end,
each whole, followed by one new footer (`joined_footer`): the parts' row groups, in order, with
their offsets moved by where each part now starts. A reader goes by the footer's offsets, so the
parts' own headers and footers inside the file are bytes that nothing points at. The assembler thus
reads only each part's footer (`part_footer`) and joins the files the way it joins gzip members
(a local copy, or a GCS compose that moves no byte through the service).
"""
from __future__ import annotations

import io
import struct
from collections.abc import Callable, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from userexport_server.export import thrift
from userexport_server.export.paths import Kind
from userexport_server.export.spec import ExportSpec
from userexport_server.export.sql import OP_FIELD, Column

ROW_GROUP_BYTES = 8 * 1024 * 1024
COMPRESSION = "zstd"
# No dictionary pages: most user columns are unique or nearly (ids, emails, names, dates), so the
# writer built each column's dictionary only to drop it at the page limit. Without them a 1M-user
# file is written in 2.4-2.9 CPU-s instead of 4.2-4.3, and is 5% smaller (zstd finds the repeats).
DICTIONARY = False
_ARROW_TYPES = {Kind.STRING: pa.large_string(), Kind.BOOL: pa.bool_(), Kind.INT: pa.int64(),
                Kind.DATETIME: pa.timestamp("ms", tz="UTC"), Kind.JSON: pa.json_(pa.large_string())}


class ParquetColumns:
    """The Parquet columns of one spec: its Arrow schema, and a batch (reader.py) made a table of it
    in pyarrow's compute kernels; `op`: an incremental export's `_op` column comes first."""

    def __init__(self, spec: ExportSpec, columns: Sequence[Column], fields: Sequence[int | None],
                 op: bool = False) -> None:
        kinds = [None if i is None else columns[i].kind for i in fields]
        self.schema = pa.schema([pa.field(OP_FIELD, pa.large_string())] * op +
                                [pa.field(f.title, _ARROW_TYPES[kind or Kind.STRING])
                                 for f, kind in zip(spec.fields, kinds)])
        self._sources: list[str | None] = [None if i is None else f"c{i}" for i in fields]
        if op:
            self._sources.insert(0, "op")

    def table(self, batch: pa.RecordBatch) -> pa.Table:
        """The batch's users as a table of the schema (a field no user has: all null)."""
        return pa.Table.from_arrays([_value(None if name is None else batch.column(name), field.type, batch.num_rows)
                                     for name, field in zip(self._sources, self.schema)], schema=self.schema)


def _value(array: pa.Array | None, type: pa.DataType, rows: int) -> pa.Array:
    """A field's column as its Parquet type: dates floored to milliseconds, JSON null as null."""
    if array is None:
        return pa.nulls(rows, type)
    if isinstance(array, pa.ExtensionArray):
        array = array.storage
    if pa.types.is_timestamp(type):
        return pc.floor_temporal(array, unit="millisecond").cast(type)
    if isinstance(type, pa.BaseExtensionType):  # JSON text
        text = array.cast(type.storage_type)
        return pa.ExtensionArray.from_storage(type, pc.if_else(pc.equal(text, "null"), None, text))
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
        self._writer = pq.ParquetWriter(_Sink(write), schema, compression=COMPRESSION,
                                       use_dictionary=DICTIONARY)
        self._pending: list[pa.Table] = []
        self._size = 0

    def write(self, table: pa.Table) -> None:
        """Add rows to the pending row group, written once it is big enough."""
        self._pending.append(table)
        self._size += table.nbytes
        if self._size >= ROW_GROUP_BYTES:
            self._flush()

    def close(self) -> None:
        """Write the pending row group and the footer."""
        self._flush()
        self._writer.close()

    def _flush(self) -> None:
        if self._pending:
            table = pa.concat_tables(self._pending)
            self._pending, self._size = [], 0
            self._writer.write_table(table, row_group_size=max(1, table.num_rows))


MAGIC = b"PAR1"
# A Parquet file ends with its footer's length (4 bytes, little-endian) and MAGIC.
_END = struct.Struct("<I4s")
# What part_footer reads first: a part's footer is a few KiB (a row group's column metadata), so
# one read almost always gets it whole.
FOOTER_GUESS = 64 * 1024
# FileMetaData, RowGroup, ColumnChunk and ColumnMetaData field ids (parquet.thrift).
_NUM_ROWS, _ROW_GROUPS = 3, 4
_RG_COLUMNS, _RG_NUM_ROWS, _RG_FILE_OFFSET, _RG_ORDINAL = 1, 3, 5, 7
_CC_FILE_OFFSET, _CC_META = 2, 3
_CC_PAGE_INDEX = (4, 5, 6, 7)  # offset and column index: offsets and lengths
_CM_OFFSETS = (9, 10, 11, 14)  # data, index and dictionary page, bloom filter
_SAME = (1, 2, 5, 7)  # version, schema, key-value metadata (the Arrow schema), column orders


def part_footer(size: int, read: Callable[[int, int], bytes]) -> bytes:
    """The footer (FileMetaData) of a Parquet file of `size` bytes, read through `read(start, end)`
    (bytes [start, end)): its tail, and the rest of the footer if the tail was too short.
    ValueError when the file does not end like a Parquet file."""
    if size < len(MAGIC) + _END.size:
        raise ValueError(f"{size} bytes are too few for a Parquet file")
    start = max(0, size - FOOTER_GUESS)
    tail = read(start, size)
    length, magic = _END.unpack(tail[-_END.size:])
    if magic != MAGIC or length > size - len(MAGIC) - _END.size:
        raise ValueError("the file does not end with a Parquet footer")
    begin = size - _END.size - length
    if begin < start:
        tail = read(begin, start) + tail
        start = begin
    return tail[begin - start:len(tail) - _END.size]


def joined_footer(footers: Sequence[bytes], sizes: Sequence[int]) -> tuple[bytes, list[int]]:
    """What to write after the Parquet files whose footers are `footers` and sizes `sizes`, laid end
    to end, to make them one file: a footer of all their row groups in order (offsets moved by where
    each file starts, ordinals renumbered, page indexes dropped, as their pages' offsets cannot be
    moved), its length and MAGIC. Also returns each file's rows. ValueError when the files differ in
    schema (they are parts of one export, so they never do) or a footer is no FileMetaData."""
    if not footers or len(footers) != len(sizes):
        raise ValueError("a footer and a size for each part, and at least one part")
    parts = [thrift.decode(footer) for footer in footers]
    first = parts[0]
    row_groups: list[thrift.Struct] = []
    rows: list[int] = []
    base = 0
    for n, (part, size) in enumerate(zip(parts, sizes)):
        if any(part.get(field) != first.get(field) for field in _SAME):
            raise ValueError(f"part {n} differs from part 0 in its schema or version")
        groups = part[_ROW_GROUPS][1].items
        rows.append(part[_NUM_ROWS][1])
        if sum(group[_RG_NUM_ROWS][1] for group in groups) != rows[-1]:
            raise ValueError(f"part {n}'s row groups do not add up to its rows")
        row_groups += [_moved_row_group(group, base, len(row_groups) + i) for i, group in enumerate(groups)]
        base += size
    merged = dict(first)
    merged[_NUM_ROWS] = (thrift.I64, sum(rows))
    merged[_ROW_GROUPS] = (thrift.LIST, thrift.List(thrift.STRUCT, row_groups))
    footer = thrift.encode(merged)
    return footer + _END.pack(len(footer), MAGIC), rows


def _moved_row_group(group: thrift.Struct, base: int, ordinal: int) -> thrift.Struct:
    moved = dict(group)
    moved[_RG_COLUMNS] = (thrift.LIST, thrift.List(thrift.STRUCT, [
        _moved_chunk(chunk, base) for chunk in group[_RG_COLUMNS][1].items]))
    _move(moved, (_RG_FILE_OFFSET,), base)
    if _RG_ORDINAL in moved:
        moved[_RG_ORDINAL] = (thrift.I16, ordinal)
    return moved


def _moved_chunk(chunk: thrift.Struct, base: int) -> thrift.Struct:
    moved = {field: value for field, value in chunk.items() if field not in _CC_PAGE_INDEX}
    _move(moved, (_CC_FILE_OFFSET,), base)
    meta = dict(moved[_CC_META][1])
    _move(meta, _CM_OFFSETS, base)
    moved[_CC_META] = (thrift.STRUCT, meta)
    return moved


def _move(fields: thrift.Struct, ids: Sequence[int], base: int) -> None:
    """Move the offsets `ids` of `fields` by `base`; an absent or 0 offset (unset: no data starts
    at 0, where MAGIC is) stays as it is."""
    for field in ids:
        if field in fields and fields[field][1]:
            kind, offset = fields[field]
            fields[field] = (kind, offset + base)
