"""End to end on a real server: create -> watch -> completed -> download over the signed URL -> compare
with the users in the database, for CSV and JSON, with and without connection_id, limit and export_as."""
from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select

from tests.harness import ServerHandle
from tests.integration.support import Caller, download
from userexport.v1 import users_export_pb2 as pb
from userexport_server.db.models import User

GUARD = ("=", "+", "-", "@", "\t", "\r")


def users_in_db(server: ServerHandle, tenant: str, connection_id: str | None = None) -> list[User]:
    query = select(User).where(User.tenant == tenant).order_by(User.user_id)
    if connection_id:
        query = query.where(User.connection_id == connection_id)
    with server.app.engine.connect() as conn:
        return list(conn.execute(query).all())


def guarded(value: str | None) -> str:
    if value is None:
        return ""
    return "'" + value if value.startswith(GUARD) else value


def iso(value: Any) -> str:
    return "" if value is None else value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


@pytest.fixture
def seeded(server: ServerHandle, tenant: str) -> Iterator[tuple[Caller, list[str]]]:
    connections = server.seed(500, tenant=tenant)
    caller = Caller(server, tenant)
    yield caller, connections
    caller.close()


def run_export(caller: Caller, **request: Any) -> tuple[pb.Job, list[pb.Job], bytes]:
    """Create (a None connection_id means the whole tenant), watch to the end, download."""
    if request.get("connection_id", "") is None:
        del request["connection_id"]
    created = caller.create(**request)
    assert created.status == pb.Job.PENDING and created.id.startswith("job_") and len(created.id) == 20
    messages = caller.watch(created.id)
    final = messages[-1]
    assert final.status == pb.Job.COMPLETED, final.error
    assert final.location and final.percentage_done == 100
    return final, messages, download(final.location)


@pytest.mark.parametrize("by_connection", [False, True])
def test_csv_default_fields_match_database(server: ServerHandle, tenant: str, seeded, by_connection: bool) -> None:
    caller, connections = seeded
    connection_id = connections[1] if by_connection else None
    job, messages, body = run_export(caller, format=pb.ExportRequest.CSV, connection_id=connection_id)
    rows = list(csv.reader(io.StringIO(body.decode("utf-8"), newline="")))
    header, data = rows[0], rows[1:]
    assert header == ["user_id", "email", "email_verified", "username", "name", "given_name", "family_name",
                      "nickname", "picture", "phone_number", "created_at", "updated_at", "last_login",
                      "logins_count", "blocked", "connection"]
    users = users_in_db(server, tenant, connection_id)
    assert len(data) == len(users) == job.users_written
    for row, user in zip(data, users):
        cells = dict(zip(header, row))
        assert cells["user_id"] == guarded(user.user_id)
        assert cells["email"] == guarded(user.email)
        assert cells["email_verified"] == ("" if user.email_verified is None else str(user.email_verified).lower())
        assert cells["name"] == guarded(user.name)
        assert cells["created_at"] == iso(user.created_at)
        assert cells["logins_count"] == ("" if user.logins_count is None else str(user.logins_count))
        expected_connection = user.identities[0]["connection"] if user.identities else None
        assert cells["connection"] == guarded(expected_connection)
    assert job.connection_id == (connection_id or "")
    if connection_id:
        assert job.connection  # the connection's name is echoed
    statuses = [m.status for m in messages]
    assert statuses[0] in (pb.Job.PENDING, pb.Job.PROCESSING) and statuses[-1] == pb.Job.COMPLETED
    assert pb.Job.PROCESSING in statuses


def test_csv_limit_and_export_as(server: ServerHandle, tenant: str, seeded) -> None:
    caller, connections = seeded
    job, _, body = run_export(caller, format=pb.ExportRequest.CSV, connection_id=connections[0], limit=7,
                              fields=[("email", ""), ("identities[0].connection", "provider"),
                                      ("user_metadata.no.such.path", "")])
    rows = list(csv.reader(io.StringIO(body.decode(), newline="")))
    assert rows[0] == ["email", "provider", "user_metadata.no.such.path"]
    users = users_in_db(server, tenant, connections[0])[:7]
    assert [r[0] for r in rows[1:]] == [guarded(u.email) for u in users]
    assert all(r[2] == "" for r in rows[1:])
    assert job.limit == 7 and job.users_written == 7
    assert [(f.name, f.export_as) for f in job.fields] == [("email", ""), ("identities[0].connection", "provider"),
                                                           ("user_metadata.no.such.path", "")]


@pytest.mark.parametrize("by_connection", [False, True])
def test_json_default_fields_round_trip(server: ServerHandle, tenant: str, seeded, by_connection: bool) -> None:
    caller, connections = seeded
    connection_id = connections[2] if by_connection else None
    job, _, body = run_export(caller, format=pb.ExportRequest.JSON, connection_id=connection_id)
    lines = body.decode("utf-8").splitlines()
    users = users_in_db(server, tenant, connection_id)
    assert len(lines) == len(users) == job.users_written
    for line, user in zip(lines, users):
        record = json.loads(line)
        assert record["user_id"] == user.user_id
        assert record.get("email") == user.email
        assert record.get("app_metadata") == user.app_metadata
        assert record.get("user_metadata") == user.user_metadata
        assert record.get("identities") == user.identities
        assert record.get("blocked") == user.blocked
        assert record.get("created_at") == (iso(user.created_at) or None)
        assert None not in record.values()  # missing values are left out, not null


def test_json_nesting_limit_and_export_as(server: ServerHandle, tenant: str, seeded) -> None:
    caller, _ = seeded
    _job, _, body = run_export(caller, format=pb.ExportRequest.JSON, limit=25,
                              fields=[("user_id", ""), ("identities[0].provider", "provider"),
                                      ("app_metadata.plan", "")])
    users = users_in_db(server, tenant)[:25]
    records = [json.loads(line) for line in body.decode().splitlines()]
    assert [r["user_id"] for r in records] == [u.user_id for u in users]
    for record, user in zip(records, users):
        provider = user.identities[0].get("provider") if user.identities else None
        assert record.get("provider") == provider
        plan = (user.app_metadata or {}).get("plan")
        assert record.get("app_metadata", {}).get("plan") == plan
        assert set(record) <= {"user_id", "provider", "app_metadata"}


def test_file_is_named_after_the_tenant(server: ServerHandle, tenant: str, seeded) -> None:
    caller, _ = seeded
    job, _, _ = run_export(caller, format=pb.ExportRequest.CSV, limit=1)
    assert job.location.split("?")[0].endswith(f"/{tenant}.csv.gz")


def test_every_get_signs_a_fresh_url(server: ServerHandle, tenant: str, seeded) -> None:
    caller, _ = seeded
    job, _, _ = run_export(caller, format=pb.ExportRequest.JSON, limit=3)
    import time
    time.sleep(1.1)
    again = caller.get(job.id)
    assert again.location and again.location != job.location
    assert again.location_expires_at.seconds > job.location_expires_at.seconds
    assert download(again.location) == download(job.location)
