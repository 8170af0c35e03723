"""Filtered exports through a real server on both databases: the job counts, cuts and writes only the
users its filter matches, in several slices, and echoes the filter; a bad filter is INVALID_ARGUMENT
with a BadRequest violation on `filter` that names the position; the CLI's --filter."""
from __future__ import annotations

import csv
import datetime as dt
import io
import pathlib
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from sqlalchemy import Engine, select

from tests.client.test_client_e2e import cli, csv_rows, no_cli_environment  # noqa: F401  (autouse fixture)
from tests.harness import ServerHandle, new_tenant
from tests.integration.support import Caller, detail, download, error_reason, violations
from userexport.client.cli import EXIT_OK, EXIT_RPC_ERROR
from userexport.v1 import users_export_pb2 as pb
from userexport_server.db.models import Connection, User

SINCE = dt.datetime(2019, 7, 1, tzinfo=dt.UTC)


def reference_ids(engine: Engine, tenant: str, connection_name: str) -> list[str]:
    """The users of FILTER below, by SQLAlchemy's own JSON and date handling, not export/filters.py."""
    query = (select(User.user_id).join(Connection, (Connection.tenant == User.tenant)
                                       & (Connection.id == User.connection_id))
             .where(User.tenant == tenant, User.created_at >= SINCE,
                    (Connection.name == connection_name) | (User.app_metadata["plan"].as_string() == "pro"),
                    User.blocked.is_not(True))
             .order_by(User.user_id))
    with engine.connect() as conn:
        return list(conn.execute(query).scalars())


def test_a_filtered_export_counts_cuts_and_writes_only_the_matching_users(make_server: Any) -> None:
    server = make_server(slice_users=50)
    tenant = new_tenant()
    server.seed(2_000, tenant=tenant)
    caller = Caller(server, tenant)
    name = caller.stub.ListConnections(pb.ListConnectionsRequest(), metadata=caller.metadata).connections[1].name
    text = (f'created_at >= "{SINCE.astimezone(dt.timezone(dt.timedelta(hours=2))).isoformat()}" AND '
            f'(connection = "{name}" OR app_metadata.plan = "pro") AND NOT blocked = true')
    expected = reference_ids(server.app.engine, tenant, name)
    assert 3 * 50 < len(expected) < 1_500  # several slices, and the filter leaves users out

    job = caller.finish(caller.create(format=pb.ExportRequest.CSV, fields=[("user_id", ""), ("blocked", "")],
                                      filter=text).id)
    assert job.status == pb.Job.COMPLETED, job.error
    assert (job.filter, job.users_total, job.users_written) == (text, len(expected), len(expected))
    rows = list(csv.reader(io.StringIO(download(job.location).decode())))
    assert rows[0] == ["user_id", "blocked"]
    assert [row[0] for row in rows[1:]] == expected
    assert {row[1] for row in rows[1:]} <= {"false", ""}
    caller.close()


def test_a_bad_filter_is_invalid_argument_naming_the_position(server: ServerHandle, tenant: str) -> None:
    caller = Caller(server, tenant)
    with pytest.raises(grpc.RpcError) as caught:
        caller.create(format=pb.ExportRequest.CSV, filter='blocked = true AND created_at > "yesterday"')
    error: Any = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(error) == "INVALID_ARGUMENT"
    info = detail(error, error_details_pb2.ErrorInfo)
    assert info is not None and info.metadata["field"] == "filter"
    assert violations(error) == {"filter": 'at position 33: created_at takes an RFC 3339 timestamp such as '
                                           '"2024-01-31T23:59:59Z" or "2024-02-01T08:00:00.5+09:00" (years 0001 to '
                                           '9999 in UTC), found "yesterday"'}
    caller.close()


def test_the_cli_exports_with_a_filter(server: ServerHandle, tenant: str, tmp_path: pathlib.Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    server.seed(300, tenant)
    with server.app.engine.connect() as conn:
        blocked = list(conn.execute(select(User.user_id).where(User.tenant == tenant, User.blocked.is_(True))
                                    .order_by(User.user_id)).scalars())
    assert blocked
    output = tmp_path / "blocked.csv.gz"
    assert cli(server, tenant, "export", "--format", "csv", "--field", "user_id", "--filter", "blocked = true",
               "--wait", "--output", str(output)) == EXIT_OK
    assert [row[0] for row in csv_rows(output)[1:]] == blocked
    capsys.readouterr()
    assert cli(server, tenant, "export", "--format", "csv", "--filter", "blocked = maybe") == EXIT_RPC_ERROR
    assert "  filter: at position 11: expected a value for blocked: true, false or null, found 'maybe'" in \
        capsys.readouterr().err
