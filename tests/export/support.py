"""What export tests share: a real database per backend, hand-built users, and an export runner."""
from __future__ import annotations

import contextlib
import csv
import datetime as dt
import gzip
import io
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, insert, text

from tests.databases import BACKENDS, fresh_postgres_database
from userexport_server.api.requests import build_spec
from userexport_server.db.engine import make_engine
from userexport_server.db.migrate import upgrade
from userexport_server.db.models import Connection, User
from userexport_server.export.engine import run_export

CONNECTION = "con_AAAAAAAAAAAAAAAA"
OTHER_CONNECTION = "con_BBBBBBBBBBBBBBBB"
UTC = dt.UTC


@pytest.fixture(scope="session", params=BACKENDS)
def engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """A migrated database of each backend, shared by the session (tests use their own tenants)."""
    with contextlib.ExitStack() as stack:
        if request.param == "sqlite":
            url = f"sqlite:///{tmp_path_factory.mktemp('export') / 'export.db'}"
        else:
            try:
                url = stack.enter_context(fresh_postgres_database())
            except psycopg.OperationalError as error:
                pytest.skip(f"PostgreSQL is unreachable: {error}")
        result = make_engine(url)
        stack.callback(result.dispose)
        upgrade(result)
        yield result


def new_tenant() -> str:
    return "t" + uuid.uuid4().hex[:12]


def add_users(engine: Engine, tenant: str, *users: dict[str, Any]) -> None:
    """Insert users the way the application does (SQLAlchemy types, compact JSON); both connections exist."""
    with engine.begin() as conn:
        conn.execute(
            insert(Connection),
            [{"tenant": tenant, "id": CONNECTION, "name": "Username-Password-Authentication"},
             {"tenant": tenant, "id": OTHER_CONNECTION, "name": "google-oauth2"}],
        )
        for user in users:  # one by one: each user sets its own columns
            conn.execute(insert(User).values({"tenant": tenant, "connection_id": CONNECTION, **user}))


def set_raw_json(engine: Engine, tenant: str, user_id: str, column: str, raw: str) -> None:
    """Store JSON text exactly as given (e.g. numbers written 1.50), bypassing the serializer."""
    value = ":raw" if engine.dialect.name == "sqlite" else "CAST(:raw AS json)"
    with engine.begin() as conn:
        conn.execute(
            text(f"UPDATE users SET {column} = {value} WHERE tenant = :tenant AND user_id = :user_id"),
            {"raw": raw, "tenant": tenant, "user_id": user_id},
        )


class MemoryWriter:
    """An ObjectWriter that keeps the bytes, remembering each write's size."""

    def __init__(self) -> None:
        self.buffer = io.BytesIO()
        self.sizes: list[int] = []

    def write(self, data: bytes) -> None:
        self.sizes.append(len(data))
        self.buffer.write(data)

    def commit(self) -> None:
        pass

    def abort(self) -> None:
        pass


def export_bytes(
    engine: Engine,
    tenant: str,
    format: str,
    fields: Sequence[tuple[str, str]] = (),
    connection_id: str | None = None,
    limit: int | None = None,
    **options: Any,
) -> bytes:
    """The gzip file of an export, through validation, the real SQL and the engine."""
    spec = build_spec(format=format, connection_id=connection_id, limit=limit, fields=fields)
    writer = MemoryWriter()
    with engine.connect() as conn:
        run_export(conn, tenant, spec, writer, **options)
    return writer.buffer.getvalue()


def export_text(engine: Engine, tenant: str, format: str, fields: Sequence[tuple[str, str]] = (), **kw: Any) -> str:
    return gzip.decompress(export_bytes(engine, tenant, format, fields, **kw)).decode("utf-8")


def csv_table(data: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(data, newline="")))
