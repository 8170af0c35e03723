"""Parquet exports on every backend: typed columns, JSON as text with the JSON logical type, titles,
defaults, and slices joined into one file whose row groups are the slices'."""
from __future__ import annotations

import datetime as dt
import io
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlalchemy import Engine

from tests.export.support import UTC, MemoryWriter, add_users, new_tenant, set_raw_json
from tests.export.test_csv import ALICE
from userexport_server.api.requests import build_spec
from userexport_server.export.defaults import DEFAULT_JSON_FIELDS
from userexport_server.export.engine import run_export
from userexport_server.export.parquet import joined_footer, part_footer
from userexport_server.export.sql import KeyRange, count_users, key_ranges
from userexport_server.seed import seed_users


def export(engine: Engine, tenant: str, fields: Sequence[tuple[str, str]] = (), key_range: KeyRange | None = None,
           limit: int | None = None) -> bytes:
    writer = MemoryWriter()
    with engine.connect() as conn:
        run_export(conn, tenant, build_spec(format="parquet", fields=fields, connection_id=None, limit=limit),
                   writer, key_range=key_range)
    return writer.buffer.getvalue()


def table(data: bytes) -> pa.Table:
    return pq.read_table(io.BytesIO(data))


def footer_of(data: bytes) -> bytes:
    """The footer of the Parquet file `data`, read as the assembler reads a part's."""
    return part_footer(len(data), lambda start, end: data[start:end])


@pytest.fixture
def tenant(engine: Engine) -> str:
    tenant = new_tenant()
    add_users(engine, tenant, ALICE, {"user_id": "auth0|bob", "created_at": dt.datetime(1969, 12, 31, 23, 59, 59,
                                                                                      999500, tzinfo=UTC)})
    set_raw_json(engine, tenant, "auth0|alice", "app_metadata", '{"n":1.50,"big":1e400,"z":null,"o": {"k": [1, 2]}}')
    return tenant


def test_default_fields_are_jsons_with_typed_columns(engine: Engine, tenant: str) -> None:
    result = table(export(engine, tenant))
    assert result.column_names == [f.name for f in DEFAULT_JSON_FIELDS]
    types = {f.name: f.type for f in result.schema}
    assert types["user_id"] == pa.large_string() and types["email_verified"] == pa.bool_()
    assert types["logins_count"] == pa.int64() and types["created_at"] == pa.timestamp("ms", tz="UTC")
    assert isinstance(types["identities"], pa.JsonType)
    alice, bob = result.to_pylist()
    assert alice["email_verified"] is True and alice["blocked"] is False and alice["logins_count"] == 7
    assert alice["created_at"] == dt.datetime(2017, 11, 2, 23, 34, 3, 803000, tzinfo=UTC)  # truncated to ms
    assert bob["created_at"] == dt.datetime(1969, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)  # floored, before 1970
    assert alice["multifactor"] == '["guardian"]' and bob["multifactor"] is None and bob["email"] is None
    assert pq.ParquetFile(io.BytesIO(export(engine, tenant))).metadata.row_group(0).column(0).compression == "ZSTD"


def test_the_files_json_columns_carry_parquets_json_logical_type(engine: Engine, tenant: str) -> None:
    schema = pq.ParquetFile(io.BytesIO(export(engine, tenant, [("app_metadata.o", "")]))).schema
    assert "(JSON)" in str(schema.column(0).logical_type) or schema.column(0).logical_type.type == "JSON"


def test_json_paths_are_their_text_as_stored_and_export_as_names_columns(engine: Engine, tenant: str) -> None:
    fields = [("app_metadata.n", "n"), ("app_metadata.big", ""), ("app_metadata.z", ""), ("app_metadata.o", "o"),
              ("identities[0].connection", "connection"), ("email.domain", ""), ("email", "mail")]
    result = table(export(engine, tenant, fields))
    assert result.column_names == ["n", "app_metadata.big", "app_metadata.z", "o", "connection", "email.domain",
                                   "mail"]
    alice: dict[str, Any] = result.to_pylist()[0]
    o = '{"k": [1, 2]}' if engine.dialect.name == "postgresql" else '{"k":[1,2]}'  # as each database gives it
    assert alice == {"n": "1.50", "app_metadata.big": "1e400", "app_metadata.z": None, "o": o,
                     "connection": '"Username-Password-Authentication"', "email.domain": None,
                     "mail": "alice@example.com"}


def test_slices_laid_end_to_end_under_one_footer_are_the_whole_export(engine: Engine) -> None:
    """The parts as written, one after the other, then joined_footer: one file of their row groups,
    in order, which reads as the single-pass export; a part of no users (a range emptied since
    planning) adds no row group."""
    tenant = new_tenant()
    seed_users(engine, tenant=tenant, users=2500)
    spec = build_spec(format="parquet", fields=[], connection_id=None, limit=None)
    with engine.connect() as conn:
        ranges = key_ranges(conn, tenant, spec, count_users(conn, tenant, spec), 1000)
    empty = KeyRange(ranges[0].through, ranges[0].through, 0)  # after == through: no user is in it
    parts = [export(engine, tenant, key_range=r) for r in (ranges[0], empty, *ranges[1:])]
    footers = [footer_of(part) for part in parts]
    tail, rows = joined_footer(footers, [len(part) for part in parts])
    assert rows == [1000, 0, 1000, 500]
    whole = pq.ParquetFile(io.BytesIO(b"".join(parts) + tail))
    assert [whole.metadata.row_group(i).num_rows for i in range(whole.num_row_groups)] == [1000, 1000, 500]
    assert whole.read().equals(table(export(engine, tenant)))
    assert whole.schema_arrow.equals(table(parts[0]).schema)


def test_an_empty_export_is_a_file_with_the_schema(engine: Engine) -> None:
    tenant = new_tenant()
    add_users(engine, tenant)
    result = table(export(engine, tenant, [("user_id", ""), ("created_at", "")]))
    assert result.num_rows == 0 and result.column_names == ["user_id", "created_at"]
