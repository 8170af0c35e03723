"""The footer codec (export/thrift.py) and the joining of Parquet parts under one footer
(parquet.joined_footer), on files pyarrow writes with every footer feature it has: statistics,
dictionaries, page indexes, bloom filters, many row groups. The joined files are read by pyarrow,
DuckDB and polars, which follow the moved offsets (DuckDB's bloom filter and statistics pruning too)."""
from __future__ import annotations

import io
import pathlib
import struct
from typing import Any

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.export.test_parquet import footer_of
from userexport_server.export import thrift
from userexport_server.export.parquet import FOOTER_GUESS, MAGIC, joined_footer, part_footer

SCHEMA = pa.schema([("id", pa.int64()), ("name", pa.large_string()), ("ok", pa.bool_()),
                    ("at", pa.timestamp("ms", tz="UTC")), ("doc", pa.json_(pa.large_string()))])


def rows(low: int, high: int) -> pa.Table:
    ids = list(range(low, high))
    return pa.table({"id": pa.array(ids, pa.int64()), "name": pa.array([f"user {i}" for i in ids], pa.large_string()),
                     "ok": pa.array([i % 3 == 0 if i % 7 else None for i in ids], pa.bool_()),
                     "at": pa.array([i * 1000 for i in ids], pa.timestamp("ms", tz="UTC")),
                     "doc": pa.array([f'{{"n":{i}}}' for i in ids], pa.json_(pa.large_string()))}, schema=SCHEMA)


def parquet(table: pa.Table, row_group: int = 1000, **options: Any) -> bytes:
    out = io.BytesIO()
    with pq.ParquetWriter(out, SCHEMA, compression="zstd", **options) as writer:
        writer.write_table(table, row_group_size=row_group)
    return out.getvalue()


def joined(parts: list[bytes]) -> bytes:
    tail, _ = joined_footer([footer_of(part) for part in parts], [len(part) for part in parts])
    return b"".join(parts) + tail


FEATURES = {
    "plain": {},
    "page index": {"write_page_index": True},
    "bloom filters": {"bloom_filter_options": {"name": {"ndv": 5000, "fpp": 0.01}, "id": {"ndv": 5000, "fpp": 0.01}}},
    "no statistics or dictionary": {"write_statistics": False, "use_dictionary": False},
}


@pytest.mark.parametrize("options", FEATURES.values(), ids=FEATURES.keys())
def test_pyarrows_footers_decode_and_encode_to_the_same_bytes(options: dict[str, Any]) -> None:
    footer = footer_of(parquet(rows(0, 5000), row_group=100, **options))  # 50 row groups: a long list header
    decoded = thrift.decode(footer)
    assert len(decoded[4][1].items) == 50
    assert thrift.encode(decoded) == footer


def test_every_kind_of_value_survives_a_round_trip() -> None:
    value: thrift.Struct = {
        1: (thrift.TRUE, True), 2: (thrift.TRUE, False), 3: (thrift.BYTE, -128), 4: (thrift.I16, -32768),
        5: (thrift.I32, 2**31 - 1), 6: (thrift.I64, -(2**63)), 7: (thrift.DOUBLE, -0.5),
        8: (thrift.BINARY, b"\x00\xff"),
        40: (thrift.LIST, thrift.List(thrift.TRUE, [True, False, True])),  # a field 33 past the last: long form
        41: (thrift.SET, thrift.List(thrift.I64, list(range(-20, 20)))),
        3000: (thrift.STRUCT, {1: (thrift.LIST, thrift.List(thrift.STRUCT, [{}, {2: (thrift.I32, 7)}]))}),
    }
    assert thrift.decode(thrift.encode(value)) == value


@pytest.mark.parametrize("damage", [lambda b: b[:-1], lambda b: b[:len(b) // 2], lambda b: b + b"\x00"],
                         ids=["last byte cut", "half cut", "a byte after"])
def test_a_damaged_footer_is_a_value_error(damage: Any) -> None:
    footer = footer_of(parquet(rows(0, 10)))
    with pytest.raises(ValueError, match="thrift"):
        thrift.decode(damage(footer))


@pytest.mark.parametrize("options", FEATURES.values(), ids=FEATURES.keys())
def test_parts_laid_end_to_end_under_a_joined_footer_read_as_one_file(options: dict[str, Any],
                                                                     tmp_path: pathlib.Path) -> None:
    bounds = [(0, 2500), (2500, 2500), (2500, 2501), (2501, 7000)]
    parts = [parquet(rows(low, high), **options) for low, high in bounds]
    path = tmp_path / "joined.parquet"
    path.write_bytes(joined(parts))
    whole = pq.ParquetFile(path)
    assert whole.read().equals(rows(0, 7000))
    assert [whole.metadata.row_group(i).num_rows for i in range(whole.num_row_groups)] == \
        [1000, 1000, 500, 0, 1, 1000, 1000, 1000, 1000, 499]  # pyarrow writes an empty table as a group
    chunks = [whole.metadata.row_group(i).column(j) for i in range(whole.num_row_groups) for j in range(5)]
    assert not any(c.has_offset_index or c.has_column_index for c in chunks), "a page index whose offsets are stale"
    assert pl.read_parquet(path).equals(pl.from_arrow(rows(0, 7000)))  # type: ignore[arg-type]
    with duckdb.connect() as db:
        assert db.execute(f"SELECT count(*), sum(id), count(ok) FROM '{path}'").fetchone() == \
            (7000, sum(range(7000)), sum(1 for i in range(7000) if i % 7))
        # Equality and range filters: DuckDB prunes row groups by their statistics and bloom filters,
        # which it finds at the moved offsets.
        assert db.execute(f"SELECT id, doc FROM '{path}' WHERE name = 'user 6543'").fetchall() == [(6543, '{"n":6543}')]
        assert db.execute(f"SELECT count(*) FROM '{path}' WHERE id BETWEEN 2400 AND 2600").fetchone() == (201,)
        assert db.execute(f"SELECT typeof(doc) FROM '{path}' LIMIT 1").fetchone() == ("JSON",)


def test_each_parts_rows_are_returned() -> None:
    parts = [parquet(rows(0, 10)), parquet(rows(10, 10)), parquet(rows(10, 25))]
    _, counts = joined_footer([footer_of(p) for p in parts], [len(p) for p in parts])
    assert counts == [10, 0, 15]


def test_parts_of_another_schema_are_refused() -> None:
    other = io.BytesIO()
    pq.write_table(pa.table({"id": pa.array([1], pa.int64())}), other)
    parts = [parquet(rows(0, 10)), other.getvalue()]
    with pytest.raises(ValueError, match="part 1 differs from part 0"):
        joined_footer([footer_of(p) for p in parts], [len(p) for p in parts])


def test_a_footer_longer_than_the_first_read_is_read_whole() -> None:
    """Many small row groups make a footer over FOOTER_GUESS: part_footer reads the rest before it."""
    data = parquet(rows(0, 20000), row_group=20)
    length = struct.unpack("<I", data[-8:-4])[0]
    assert length > FOOTER_GUESS
    reads: list[tuple[int, int]] = []

    def read(start: int, end: int) -> bytes:
        reads.append((start, end))
        return data[start:end]

    assert part_footer(len(data), read) == data[-8 - length:-8]
    assert len(reads) == 2


@pytest.mark.parametrize("data", [b"", MAGIC * 2, b"x" * 100 + MAGIC, b"PAR1" + b"\xff\xff\xff\x00" + MAGIC],
                         ids=["empty", "too short", "no length", "length past the start"])
def test_what_does_not_end_like_parquet_is_a_value_error(data: bytes) -> None:
    with pytest.raises(ValueError):
        part_footer(len(data), lambda start, end: data[start:end])
