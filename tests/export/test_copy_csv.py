"""PostgreSQL's COPY formatter writes the same CSV bytes as the line-building query it replaces.

A CSV export of root attributes on PostgreSQL goes through `COPY ... (FORMAT csv, FORCE_QUOTE)`;
every other export builds each line with concat(). Both must give the same file, byte for byte,
on the cells that are hard to get right: every guard character, quotes, commas, CR, LF, tab,
backslashes, empty strings, NULLs, non-ASCII, and a key range (slice) cut in the middle.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import gzip
from collections.abc import Callable

import pytest
from sqlalchemy import Engine

from tests.export.support import UTC, MemoryWriter, add_users, csv_table, new_tenant
from userexport_server.api.requests import build_spec
from userexport_server.export import sql
from userexport_server.export.engine import run_export
from userexport_server.export.sql import KeyRange, compile_export, key_ranges
from userexport_server.seed import seed_users

ROOT_FIELDS = [(name, "") for name in (
    "user_id", "email", "email_verified", "username", "name", "nickname", "picture", "phone_number",
    "created_at", "last_login", "logins_count", "blocked", "last_ip",
)]
AWKWARD = ["=SUM(A1)", "+1", "-2", "@x", "\tt", "\rr", 'say "hi"', "a,b", "line\nbreak", "cr\r\nlf", "back\\slash",
           "", "Zoë 山田 ☃", '"', "\\.", "A", "é=", " =x"]


@pytest.fixture
def pg(engine: Engine) -> Engine:
    if engine.dialect.name != "postgresql":
        pytest.skip("the COPY formatter is PostgreSQL's")
    return engine


@pytest.fixture
def tenant(pg: Engine) -> str:
    tenant = new_tenant()
    seed_users(pg, tenant=tenant, users=3000)
    add_users(pg, tenant, *(
        {"user_id": f"zz|{i:03d}", "email": value, "username": value or None, "name": value,
         "nickname": None if i % 2 else value, "picture": value, "phone_number": value, "last_ip": value,
         "logins_count": i, "blocked": bool(i % 2), "email_verified": None,
         "created_at": dt.datetime(2017, 11, 2, 23, 34, 3, 803999, tzinfo=UTC)}
        for i, value in enumerate(AWKWARD)
    ), *({"user_id": lead + "id", "email": "e"} for lead in "=+-@\t"))
    return tenant


@pytest.fixture
def without_copy(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """A switch to the line-building query, the reference the COPY path must match."""
    def off() -> None:
        line_query = dataclasses.replace(sql._DIALECTS["postgresql"], copy_csv=False)
        monkeypatch.setitem(sql._DIALECTS, "postgresql", line_query)
    return off


def export(pg: Engine, tenant: str, key_range: KeyRange | None = None, limit: int | None = None) -> bytes:
    spec = build_spec(format="csv", connection_id=None, limit=limit, fields=ROOT_FIELDS)
    writer = MemoryWriter()
    with pg.connect() as conn:
        run_export(conn, tenant, spec, writer, batch_rows=700, key_range=key_range)
    return gzip.decompress(writer.buffer.getvalue())


def test_root_attribute_csv_on_postgresql_is_a_copy_and_others_are_not() -> None:
    """Only cells COPY can quote exactly take the COPY path: a JSON path's cell is quoted when it holds a
    string and not when it holds a number, and a lone empty cell would be a blank line."""
    def copy(fields: list[tuple[str, str]], dialect: str = "postgresql", format: str = "csv") -> bool:
        spec = build_spec(format=format, connection_id=None, limit=None, fields=fields)
        return compile_export(spec, "t", dialect).copy

    assert copy(ROOT_FIELDS)
    assert copy([("user_id", ""), ("nickname.first", "")])  # never holds a value: an empty cell
    assert not copy(ROOT_FIELDS, dialect="sqlite")
    assert not copy([("user_id", "")])
    assert not copy([])  # the default fields hold identities[0].connection
    assert not copy([("user_id", ""), ("app_metadata", "")])
    assert not copy(ROOT_FIELDS, format="json")


def test_copy_writes_the_same_bytes_as_the_line_query(pg: Engine, tenant: str,
                                                     without_copy: Callable[[], None]) -> None:
    by_copy, limited = export(pg, tenant), export(pg, tenant, limit=1234)
    without_copy()
    assert by_copy == export(pg, tenant)
    assert limited == export(pg, tenant, limit=1234)
    assert len(csv_table(by_copy.decode())) == 1 + 3000 + len(AWKWARD) + 5
    for cell in (b"\"'=SUM(A1)\"", b"\"'\tt\"", b"\"'\rr\"", b'"back\\slash"', b'"say ""hi"""', b'"cr\r\nlf"'):
        assert cell in by_copy


def test_copy_slices_concatenate_into_the_whole_export(pg: Engine, tenant: str) -> None:
    spec = build_spec(format="csv", connection_id=None, limit=None, fields=ROOT_FIELDS)
    with pg.connect() as conn:
        ranges = key_ranges(conn, tenant, spec, 3000 + len(AWKWARD) + 5, 1000)
    assert len(ranges) == 4
    assert b"".join(export(pg, tenant, key_range=r) for r in ranges) == export(pg, tenant)
