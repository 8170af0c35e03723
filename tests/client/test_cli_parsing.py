"""Command-line parsing, error output and output formats: everything that needs no server."""
from __future__ import annotations

import argparse
import json

import grpc
import pytest
from google.protobuf import timestamp_pb2

from userexport.client import UsersExportClient, UsersExportError
from userexport.client.cli import build_parser, format_job, job_to_dict, main, parse_field
from userexport.v1 import users_export_pb2 as pb


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("identities[0].connection=provider", ("identities[0].connection", "provider")),
        ("email", ("email", None)),
        ("user_metadata.consent.given", ("user_metadata.consent.given", None)),
        ("email=", ("email", None)),
        ("a=b=c", ("a", "b=c")),
    ],
)
def test_parse_field(text: str, expected: tuple[str, str | None]) -> None:
    assert parse_field(text) == expected


@pytest.mark.parametrize("text", ["", "=provider"])
def test_parse_field_needs_a_name(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_field(text)


def test_export_arguments() -> None:
    args = build_parser({}).parse_args([
        "export", "--format", "csv", "--connection", "con_0123456789abcdef",
        "--field", "email", "--field", "identities[0].connection=provider",
        "--limit", "10", "--request-id", "r-1", "--wait", "--output", "out.csv.gz",
    ])
    assert args.format == "csv"
    assert args.connection == "con_0123456789abcdef"
    assert args.fields == [("email", None), ("identities[0].connection", "provider")]
    assert (args.limit, args.request_id, args.wait, args.output) == (10, "r-1", True, "out.csv.gz")


def test_global_defaults_come_from_the_environment() -> None:
    environ = {
        "USEREXPORT_SERVER": "export.internal:443",
        "USEREXPORT_TOKEN": "t0k",
        "USEREXPORT_DATA_DIR": "/var/lib/userexport",
        "USEREXPORT_TENANT": "acme",
    }
    args = build_parser(environ).parse_args(["jobs", "list"])
    assert (args.server, args.token, args.data_dir, args.tenant, args.json) == (
        "export.internal:443", "t0k", "/var/lib/userexport", "acme", False
    )
    defaults = build_parser({}).parse_args(["jobs", "list"])
    assert (defaults.server, defaults.token, defaults.data_dir, defaults.tenant) == (
        "127.0.0.1:50051", None, "data", "default"
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["--server", "h:1", "--json", "jobs", "get", "job_1"],
        ["jobs", "get", "job_1", "--server", "h:1", "--json"],
        ["jobs", "--server", "h:1", "get", "--json", "job_1"],
    ],
)
def test_global_options_anywhere_override_the_environment(argv: list[str]) -> None:
    args = build_parser({"USEREXPORT_SERVER": "env:2"}).parse_args(argv)
    assert (args.server, args.json, args.job_id) == ("h:1", True, "job_1")


def test_list_arguments() -> None:
    args = build_parser({}).parse_args(["jobs", "list", "--status", "completed", "--page-size", "5", "--all"])
    assert (args.status, args.page_size, args.all) == ("completed", 5, True)


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["export"],
        ["export", "--format", "xml"],
        ["export", "--format", "csv", "--field", "=x"],
        ["export", "--format", "csv", "--limit", "ten"],
        ["jobs", "list", "--status", "done"],
        ["jobs", "get"],
        ["jobs", "list", "--page-size", "-1"],
        ["token", "--ttl", "0"],
        ["connections"],
        ["connections", "list", "--page-size", "many"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert "usage:" in capsys.readouterr().err


@pytest.mark.parametrize(("value", "said"), [("abc", "got 'abc'"), ("-5", "got -5"), ("0", "got 0")])
def test_a_bad_ttl_says_what_is_wanted(value: str, said: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Not argparse's `invalid _positive_int value: 'abc'`."""
    assert main(["token", "--ttl", value]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == \
        f"userexport token: error: argument --ttl: must be a positive integer, {said}"


def test_format_and_status_take_either_case() -> None:
    parser = build_parser({})
    assert parser.parse_args(["export", "--format", "CSV"]).format == "csv"
    assert parser.parse_args(["export", "--format", "Json"]).format == "json"
    assert parser.parse_args(["jobs", "list", "--status", "COMPLETED"]).status == "completed"


def test_connections_list_arguments() -> None:
    args = build_parser({}).parse_args(["connections", "list", "--page-size", "5", "--page-token", "t", "--all"])
    assert (args.page_size, args.page_token, args.all) == (5, "t", True)


def test_cli_prints_rpc_errors_with_violations(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def refuse(self: UsersExportClient, *args: object, **kwargs: object) -> pb.Job:
        raise UsersExportError(
            grpc.StatusCode.INVALID_ARGUMENT,
            "Invalid export request.",
            [("connection_id", "The connection does not exist."), ("fields[3].name", "Too long.")],
        )

    monkeypatch.setattr(UsersExportClient, "create_export", refuse)
    assert main(["--token", "t", "export", "--format", "csv", "--connection", "con_nope"]) == 3
    assert capsys.readouterr().err.splitlines() == [
        "error: INVALID_ARGUMENT: Invalid export request.",
        "  connection_id: The connection does not exist.",
        "  fields[3].name: Too long.",
    ]


def completed_job() -> pb.Job:
    return pb.Job(
        id="job_0123456789abcdef",
        type="users_export",
        status=pb.Job.COMPLETED,
        connection_id="con_0123456789abcdef",
        connection="Username-Password-Authentication",
        format=pb.ExportRequest.CSV,
        fields=[pb.Field(name="email"), pb.Field(name="identities[0].connection", export_as="connection")],
        percentage_done=100,
        users_written=1200,
        users_total=1200,
        location="http://127.0.0.1:50052/files/acme.csv.gz?sig=abc",
        created_at=timestamp_pb2.Timestamp(seconds=1_700_000_000),
    )


def test_format_job_is_readable() -> None:
    assert format_job(completed_job()).splitlines() == [
        "id          job_0123456789abcdef",
        "status      completed",
        "connection  Username-Password-Authentication (con_0123456789abcdef)",
        "format      csv",
        "fields      email, identities[0].connection as connection",
        "progress    100%  1,200/1,200 users",
        "created     2023-11-14T22:13:20Z",
        "location    http://127.0.0.1:50052/files/acme.csv.gz?sig=abc",
    ]


def test_job_json_keeps_proto_field_names() -> None:
    data = json.loads(json.dumps(job_to_dict(completed_job())))
    assert data["id"] == "job_0123456789abcdef"
    assert data["status"] == "COMPLETED"
    assert data["percentage_done"] == 100
    assert data["users_written"] == "1200"  # int64 is a string in proto JSON
    assert data["fields"][1] == {"name": "identities[0].connection", "export_as": "connection"}
