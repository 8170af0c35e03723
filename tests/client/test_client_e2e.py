"""The client and the CLI against a real server (the `server` fixture of tests/conftest.py).

The fixture is expected to offer `target`, `data_dir` (holding the server's `jwt_secret`),
`token(tenant, scopes)` and `seed(users, tenant) -> connection ids`; and the `tenant` fixture gives
every test a tenant of its own, so a session-wide server can be shared.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import pathlib
import re
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from tests.harness import free_port
from userexport.client import UsersExportClient, UsersExportError
from userexport.client.cli import main
from userexport.v1 import users_export_pb2 as pb

pytestmark = pytest.mark.e2e

JOB_ID = re.compile(r"^job_[A-Za-z0-9]{16}$")


@pytest.fixture
def client(server: Any, tenant: str) -> Iterator[UsersExportClient]:
    with UsersExportClient(server.target, server.token(tenant)) as c:
        yield c


@pytest.fixture(autouse=True)
def no_cli_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI reads USEREXPORT_* variables; a developer's own must not leak into the tests."""
    for name in ("USEREXPORT_SERVER", "USEREXPORT_TOKEN", "USEREXPORT_DATA_DIR", "USEREXPORT_TENANT"):
        monkeypatch.delenv(name, raising=False)


def finish(client: UsersExportClient, job: pb.Job) -> list[pb.Job]:
    messages = list(client.watch_job(job.id))
    assert messages, "WatchJob sends the current state at once"
    return messages


def csv_rows(path: pathlib.Path) -> list[list[str]]:
    return list(csv.reader(io.StringIO(gzip.decompress(path.read_bytes()).decode())))


def ndjson(path: pathlib.Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in gzip.decompress(path.read_bytes()).decode().splitlines()]


def test_create_watch_download_csv(
    server: Any, tenant: str, client: UsersExportClient, tmp_path: pathlib.Path
) -> None:
    connection_id = server.seed(30, tenant)[0]
    job = client.create_export("csv", connection_id=connection_id)
    assert JOB_ID.match(job.id)
    assert job.status == pb.Job.PENDING and job.type == "users_export"
    assert job.connection_id == connection_id and job.format == pb.ExportRequest.CSV

    messages = finish(client, job)
    percentages = [m.percentage_done for m in messages]
    assert percentages == sorted(percentages)
    final = messages[-1]
    assert final.status == pb.Job.COMPLETED and final.percentage_done == 100
    assert final.location and final.users_written == final.users_total > 0

    path = client.download(final, tmp_path)
    assert path == tmp_path / f"{tenant}.csv.gz"
    rows = csv_rows(path)
    assert rows[0][0] == "user_id" and rows[0][-1] == "connection"
    assert len(rows) - 1 == final.users_total
    assert {row[-1] for row in rows[1:]} == {final.connection}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]


def test_json_export_with_fields_and_limit(
    server: Any, tenant: str, client: UsersExportClient, tmp_path: pathlib.Path
) -> None:
    server.seed(12, tenant)
    job = client.create_export(
        "json", limit=5, fields=[("email", None), ("identities[0].connection", "connection")]
    )
    assert [(f.name, f.export_as) for f in job.fields] == [
        ("email", ""), ("identities[0].connection", "connection")
    ]
    final = finish(client, job)[-1]
    assert final.status == pb.Job.COMPLETED
    users = ndjson(client.download(final, tmp_path / "out.json.gz"))
    assert len(users) == 5
    # The seed leaves a few users without an email; a missing value is left out of the line.
    assert all("connection" in user and set(user) <= {"email", "connection"} for user in users)
    assert any("email" in user for user in users)


def test_download_refreshes_a_refused_url(
    server: Any, tenant: str, client: UsersExportClient, tmp_path: pathlib.Path
) -> None:
    """A URL the file server refuses (403, as when expired) is re-signed once through GetJob."""
    server.seed(3, tenant)
    final = finish(client, client.create_export("csv"))[-1]
    stale = pb.Job()
    stale.CopyFrom(final)
    stale.location = final.location[:-1] + ("0" if final.location[-1] != "0" else "1")  # spoil the signature
    path = client.download(stale, tmp_path / "export.csv.gz")
    assert len(csv_rows(path)) == 4


def test_request_id_makes_create_idempotent(server: Any, tenant: str, client: UsersExportClient) -> None:
    server.seed(3, tenant)
    key = str(uuid.uuid4())
    first = client.create_export("csv", request_id=key)
    assert client.create_export("csv", request_id=key).id == first.id
    with pytest.raises(UsersExportError) as caught:
        client.create_export("json", request_id=key)
    assert caught.value.code == grpc.StatusCode.ALREADY_EXISTS
    finish(client, first)  # leave no export running into the next test


def test_list_and_iterate_jobs(server: Any, tenant: str, client: UsersExportClient) -> None:
    server.seed(3, tenant)
    jobs = [client.create_export("csv"), client.create_export("json")]
    for job in jobs:
        finish(client, job)

    page = client.list_jobs(page_size=1)
    assert len(page.jobs) == 1 and page.next_page_token
    listed = list(client.iter_jobs(page_size=1))
    assert sorted(j.id for j in listed) == sorted(j.id for j in jobs)
    assert len(list(client.iter_jobs(status="completed"))) == 2
    assert client.list_jobs(status=pb.Job.FAILED).jobs == []


def test_cancel(server: Any, tenant: str, client: UsersExportClient) -> None:
    server.seed(500, tenant)
    job = client.create_export("csv")
    try:
        cancelled = client.cancel_job(job.id)
    except UsersExportError as error:
        if error.code == grpc.StatusCode.FAILED_PRECONDITION:
            pytest.skip("the export finished before it could be cancelled")
        raise
    assert cancelled.status == pb.Job.CANCELLED
    assert finish(client, job)[-1].status == pb.Job.CANCELLED
    assert client.get_job(job.id).location == ""


def test_closing_a_watch_cancels_only_the_stream(server: Any, tenant: str, client: UsersExportClient) -> None:
    server.seed(3, tenant)
    job = client.create_export("csv")
    watch = client.watch_job(job.id)
    assert next(watch).id == job.id
    watch.close()
    assert finish(client, job)[-1].status == pb.Job.COMPLETED


def test_errors_carry_field_violations(server: Any, tenant: str, client: UsersExportClient) -> None:
    server.seed(3, tenant)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"connection_id": "con_bad"}, "connection_id"),
        ({"connection_id": "con_" + "A" * 16}, "connection_id"),
        ({"limit": 0}, "limit"),
        ({"fields": [("email", None), ("", None)]}, "fields[1].name"),
    ]
    for kwargs, field in cases:
        with pytest.raises(UsersExportError) as caught:
            client.create_export("csv", **kwargs)
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT, kwargs
        assert field in [f for f, _ in caught.value.violations], caught.value.violations
    with pytest.raises(UsersExportError) as caught:
        client.create_export("csv", connection_id="con_" + "A" * 16)
    assert ("connection_id", "The connection does not exist.") in caught.value.violations


def test_auth_and_tenant_errors(server: Any, tenant: str, client: UsersExportClient) -> None:
    server.seed(3, tenant)
    job = client.create_export("csv")
    with pytest.raises(UsersExportError) as caught:
        client.get_job("job_" + "0" * 16)
    assert caught.value.code == grpc.StatusCode.NOT_FOUND

    with UsersExportClient(server.target, server.token("other" + tenant)) as stranger, \
            pytest.raises(UsersExportError) as caught:
        stranger.get_job(job.id)
    assert caught.value.code == grpc.StatusCode.NOT_FOUND

    with UsersExportClient(server.target) as anonymous, pytest.raises(UsersExportError) as caught:
        anonymous.get_job(job.id)
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED

    with UsersExportClient(server.target, server.token(tenant, ("create:users",))) as reader:
        assert reader.get_job(job.id).id == job.id
        with pytest.raises(UsersExportError) as caught:
            reader.create_export("csv")
    assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
    finish(client, job)


def cli(server: Any, tenant: str, *argv: str) -> int:
    """The CLI as a user runs it locally: no --token, minted from the server's data directory."""
    return main(["--server", server.target, "--data-dir", str(server.data_dir), "--tenant", tenant, *argv])


def test_cli_export_wait_downloads(
    server: Any, tenant: str, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server.seed(20, tenant)
    output = tmp_path / "users.csv.gz"
    assert cli(server, tenant, "export", "--format", "csv", "--field", "email",
               "--field", "identities[0].connection=provider", "--wait", "--output", str(output)) == 0
    out, err = capsys.readouterr()
    job_id, path = out.splitlines()
    assert JOB_ID.match(job_id) and path == str(output)
    assert "completed" in err and "100%" in err
    rows = csv_rows(output)
    assert rows[0] == ["email", "provider"] and len(rows) == 21

    assert cli(server, tenant, "--json", "jobs", "get", job_id) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "COMPLETED"
    assert cli(server, tenant, "download", job_id, "--output", str(tmp_path)) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / f"{tenant}.csv.gz")
    assert cli(server, tenant, "jobs", "watch", job_id) == 0
    assert capsys.readouterr().out.split()[0] == "completed"
    assert cli(server, tenant, "--json", "jobs", "list", "--all") == 0
    assert [j["id"] for j in json.loads(capsys.readouterr().out)["jobs"]] == [job_id]

    assert cli(server, tenant, "jobs", "delete", job_id) == 0
    assert "expired" in capsys.readouterr().out
    assert cli(server, tenant, "download", job_id, "--output", str(tmp_path / "again.gz")) == 1  # revoked


def test_cli_token_is_accepted_by_the_server(
    server: Any, tenant: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--data-dir", str(server.data_dir), "token", "--tenant", tenant]) == 0
    token = capsys.readouterr().out.strip()
    with UsersExportClient(server.target, token) as client:
        assert client.list_jobs().jobs == []


def test_cli_invalid_argument_exits_3(
    server: Any, tenant: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(server, tenant, "export", "--format", "csv", "--connection", "con_bad") == 3
    err = capsys.readouterr().err
    assert err.startswith("error: INVALID_ARGUMENT: ")
    assert "\n  connection_id: " in err


def test_cli_unreachable_server_exits_4(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    address = f"127.0.0.1:{free_port()}"
    assert main(["--server", address, "--data-dir", str(tmp_path), "jobs", "list"]) == 4
    assert address in capsys.readouterr().err
