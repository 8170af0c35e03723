"""Input handling on a real server: each request rule is INVALID_ARGUMENT with its violation, all at
once, and nothing is created; a missing or unknown format names the proto's enum values; hostile
bytes and text end as a clean INVALID_ARGUMENT or UNAUTHENTICATED, log no traceback, and repeats are
logged at a bounded rate. (The rules on their own: tests/api/test_requests.py; fuzzing:
test_input_fuzz.py; every error's details: test_error_details.py.)"""
from __future__ import annotations

import gzip
import logging
import urllib.request
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message_factory import GetMessageClass

from tests.harness import ServerHandle
from tests.integration.support import UNKNOWN_FIELD_100, Caller, call_get, error_reason, hs256, raw_call, violations
from userexport.v1 import users_export_pb2 as pb
from userexport_server.api.servicer import SERVICE
from userexport_server.logs import EventLog, RateLimitedLog

METHODS = list(SERVICE.methods)
A_JOB = "job_" + "A" * 16


def refusal(caller: Caller, method: MethodDescriptor, raw: bytes) -> grpc.RpcError:
    call = raw_call(caller.channel, method)
    with pytest.raises(grpc.RpcError) as error:
        reply = call(raw, metadata=caller.metadata, timeout=10)
        if method.server_streaming:
            list(reply)
    return error.value


def a_valid_request(method: MethodDescriptor) -> bytes:
    """A request of the method's type that would pass validation, as bytes."""
    request = GetMessageClass(method.input_type)()
    if "id" in request.DESCRIPTOR.fields_by_name:
        request.id = A_JOB
    if isinstance(request, pb.ExportRequest):
        request.format = pb.ExportRequest.CSV
    return request.SerializeToString()


@pytest.fixture
def caller(server: ServerHandle, tenant: str) -> Caller:
    return Caller(server, tenant)


@pytest.mark.parametrize("method", METHODS, ids=[m.name for m in METHODS])
def test_undecodable_bytes_are_invalid_argument_with_a_plain_message(caller: Caller, method: MethodDescriptor) -> None:
    """Before: grpc's own deserializer raised DecodeError, the call was UNKNOWN and a traceback logged."""
    text_field = next(f for f in method.input_type.fields if f.type == f.TYPE_STRING)
    bad_utf8 = bytes([text_field.number << 3 | 2, 2]) + b"\xff\xfe"
    for raw in (b"\xff\xff\xff", bad_utf8):  # a corrupt tag; a string field of invalid UTF-8
        error = refusal(caller, method, raw)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert error.details() == f"The request is not a valid {method.input_type.full_name} message."
        assert error_reason(error) == "MALFORMED_REQUEST"


@pytest.mark.parametrize("method", METHODS, ids=[m.name for m in METHODS])
def test_unknown_fields_are_refused_on_every_rpc(caller: Caller, method: MethodDescriptor) -> None:
    """Before: only CreateUsersExportJob refused them; the others silently dropped them."""
    error = refusal(caller, method, a_valid_request(method) + UNKNOWN_FIELD_100)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(error) == "UNKNOWN_FIELDS"


def test_an_unknown_field_inside_a_nested_message_is_refused(caller: Caller) -> None:
    field = pb.Field(name="email").SerializeToString() + UNKNOWN_FIELD_100
    raw = a_valid_request(SERVICE.methods_by_name["CreateUsersExportJob"]) + b"\x22" + bytes([len(field)]) + field
    error = refusal(caller, SERVICE.methods_by_name["CreateUsersExportJob"], raw)
    assert error_reason(error) == "UNKNOWN_FIELDS"
    assert list(caller.list().jobs) == []


@pytest.mark.parametrize("call", ["get", "watch", "cancel"])
def test_a_job_id_with_a_trailing_newline_is_invalid_argument(caller: Caller, call: str) -> None:
    """Before: `re.match(...$)` let "job_...\\n" through to SQL."""
    with pytest.raises(grpc.RpcError) as error:
        getattr(caller, call)(A_JOB + "\n")
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(violations(error.value)) == {"id"}


@pytest.mark.parametrize(("request_fields", "violated"), [
    ({"connection_id": "con_" + "A" * 16 + "\n"}, "connection_id"),
    ({"request_id": "abc\n"}, "request_id"),
    ({"fields": [("email", "mail\x00")]}, "fields[0].export_as"),
    ({"fields": [("email", "li\u2028ne")]}, "fields[0].export_as"),
    ({"fields": [("name", ""), ("email", "\u202etxt.exe")]}, "fields[1].export_as"),
    ({"fields": [("email\n", "")]}, "fields[0].name"),
], ids=["connection_id newline", "request_id newline", "export_as NUL", "export_as line separator",
        "export_as bidi override", "field name newline"])
def test_control_characters_and_trailing_newlines_in_export_requests_are_refused(
        server: ServerHandle, caller: Caller, tenant: str, request_fields: dict[str, Any], violated: str) -> None:
    """Before: a connection id ending in a newline gave a silent empty export (SQLite) or INTERNAL
    (PostgreSQL varchar overflow); control characters went into the CSV header."""
    server.seed(2, tenant=tenant)
    with pytest.raises(grpc.RpcError) as error:
        caller.create(format=pb.ExportRequest.CSV, **request_fields)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
    assert violated in violations(error.value), violations(error.value)
    assert list(caller.list().jobs) == []


def test_a_page_token_with_control_characters_is_invalid_argument(caller: Caller) -> None:
    with pytest.raises(grpc.RpcError) as error:
        caller.list(page_token="abc\n")
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(violations(error.value)) == {"page_token"}


def test_a_tenant_claim_with_a_trailing_newline_is_unauthenticated(server: ServerHandle) -> None:
    """Before: "default\\n" matched the tenant pattern and the caller acted in tenant "default\\n"."""
    error = call_get(server, hs256(server, tenant="default\n"))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_reason(error) == "NO_TENANT"


def test_bad_requests_log_no_traceback_and_a_bounded_number_of_lines(
        caller: Caller, server: ServerHandle, caplog: pytest.LogCaptureFixture) -> None:
    """200 undecodable or unknown-field requests: no traceback, and at most the rate limit's lines per kind."""
    caplog.set_level(logging.INFO)
    get, watch = SERVICE.methods_by_name["GetJob"], SERVICE.methods_by_name["WatchJob"]
    kinds = [(get, b"\xff\xff\xff"), (watch, b"\xff\xff\xff"), (get, a_valid_request(get) + UNKNOWN_FIELD_100)]
    for i in range(200):
        method, raw = kinds[i % len(kinds)]
        assert refusal(caller, method, raw).code() == grpc.StatusCode.INVALID_ARGUMENT
    records = [r for r in caplog.records if r.name.startswith(("userexport", "grpc"))]
    assert not [r for r in records if r.exc_info or "Traceback" in r.getMessage()], records
    limit = RateLimitedLog(EventLog("test")).limit
    assert len(records) <= len(kinds) * (limit + 1), [r.getMessage() for r in records]


# Paths no user has (a typo in a root, `emial`, is refused instead: the request rules below).
NEVER_PRESENT = [["email.x"], ["user_metadata.foo.bar", "email.x"]]


@pytest.mark.parametrize("names", NEVER_PRESENT, ids=["below a scalar", "only unknown paths"])
@pytest.mark.parametrize("fmt", [pb.ExportRequest.CSV, pb.ExportRequest.JSON], ids=["csv", "json"])
def test_an_export_of_fields_that_never_hold_a_value_completes_with_empty_rows(
        server: ServerHandle, caller: Caller, tenant: str, names: list[str], fmt: int) -> None:
    """Before: FAILED with an internal error (SQLite printf('') is NULL, PostgreSQL concat() without arguments)."""
    server.seed(3, tenant=tenant)
    job = caller.finish(caller.create(format=fmt, fields=[(n, "") for n in names]).id)
    assert job.status == pb.Job.COMPLETED, job.error
    with urllib.request.urlopen(job.location, timeout=30) as response:
        text = gzip.decompress(response.read()).decode()
    if fmt == pb.ExportRequest.CSV:
        empty_row = '""' if len(names) == 1 else "," * (len(names) - 1)
        assert text == ",".join(f'"{n}"' for n in names) + "\r\n" + (empty_row + "\r\n") * 3
    else:
        assert text == "{}\n" * 3


# Request rules, over the wire.

@pytest.fixture
def seeded_caller(server: ServerHandle, tenant: str) -> Caller:
    server.seed(3, tenant=tenant)
    return Caller(server, tenant)


def rejected(caller: Caller, request: pb.ExportRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        caller.stub.CreateUsersExportJob(request, metadata=caller.metadata)
    assert list(caller.list().jobs) == [], "a rejected request creates nothing"
    return error.value


CASES = {
    # name: (request, the violated fields)
    "format missing": (pb.ExportRequest(), {"format"}),
    "format unknown number": (pb.ExportRequest(format=7), {"format"}),  # type: ignore[arg-type]
    "connection_id pattern": (pb.ExportRequest(format=pb.ExportRequest.CSV, connection_id="con_short"),
                              {"connection_id"}),
    "connection does not exist": (pb.ExportRequest(format=pb.ExportRequest.CSV, connection_id="con_" + "A" * 16),
                                  {"connection_id"}),
    "limit zero": (pb.ExportRequest(format=pb.ExportRequest.CSV, limit=0), {"limit"}),
    "limit negative": (pb.ExportRequest(format=pb.ExportRequest.JSON, limit=-5), {"limit"}),
    "field name empty": (pb.ExportRequest(format=pb.ExportRequest.CSV, fields=[pb.Field(name="email"), pb.Field()]),
                         {"fields[1].name"}),
    "field name too long": (pb.ExportRequest(format=pb.ExportRequest.CSV, fields=[pb.Field(name="a" * 101)]),
                            {"fields[0].name"}),
    "field path invalid": (pb.ExportRequest(format=pb.ExportRequest.CSV, fields=[pb.Field(name="a..b")]),
                           {"fields[0].name"}),
    "field root unknown (a typo)": (pb.ExportRequest(format=pb.ExportRequest.CSV,
                                                     fields=[pb.Field(name="email"), pb.Field(name="emial")]),
                                    {"fields[1].name"}),
    "export_as too long": (pb.ExportRequest(format=pb.ExportRequest.CSV,
                                            fields=[pb.Field(name="email", export_as="x" * 101)]),
                           {"fields[0].export_as"}),
    "too many fields": (pb.ExportRequest(format=pb.ExportRequest.CSV,
                                         fields=[pb.Field(name=f"user_metadata.f{i}") for i in range(31)]),
                        {"fields"}),
    "duplicate columns": (pb.ExportRequest(format=pb.ExportRequest.CSV,
                                           fields=[pb.Field(name="email"), pb.Field(name="name", export_as="email")]),
                          {"fields[1].export_as"}),
    "request_id too long": (pb.ExportRequest(format=pb.ExportRequest.CSV, request_id="r" * 37), {"request_id"}),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_each_rule_is_invalid_argument_with_its_violation(seeded_caller: Caller, case: str) -> None:
    request, fields = CASES[case]
    error = rejected(seeded_caller, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(violations(error)) == fields, violations(error)
    assert error_reason(error) == "INVALID_ARGUMENT"


def test_all_violations_are_reported_at_once(seeded_caller: Caller) -> None:
    error = rejected(seeded_caller, pb.ExportRequest(
        connection_id="nope", limit=0, fields=[pb.Field(name=""), pb.Field(name="email", export_as="y" * 200)]))
    assert set(violations(error)) == {"format", "connection_id", "limit", "fields[0].name", "fields[1].export_as"}
    assert "connection_id" in error.details()


def test_unknown_request_fields_are_rejected(seeded_caller: Caller) -> None:
    raw = pb.ExportRequest(format=pb.ExportRequest.CSV).SerializeToString() + b"\xa0\x06\x01"  # field 100
    call = seeded_caller.channel.unary_unary("/userexport.v1.UsersExportService/CreateUsersExportJob",
                                             request_serializer=lambda b: b, response_deserializer=pb.Job.FromString)
    with pytest.raises(grpc.RpcError) as error:
        call(raw, metadata=seeded_caller.metadata)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(error.value) == "UNKNOWN_FIELDS"
    assert list(seeded_caller.list().jobs) == []


def test_oversize_request_is_refused_by_grpc(seeded_caller: Caller) -> None:
    huge = pb.ExportRequest(format=pb.ExportRequest.CSV, request_id="x" * 200_000)
    error = rejected(seeded_caller, huge)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_unknown_job_is_not_found(seeded_caller: Caller) -> None:
    for call in (seeded_caller.get, seeded_caller.cancel, seeded_caller.watch):
        with pytest.raises(grpc.RpcError) as error:
            call("job_" + "Z" * 16)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
        assert error_reason(error.value) == "JOB_NOT_FOUND"


def test_malformed_job_id_is_invalid_argument(seeded_caller: Caller) -> None:
    with pytest.raises(grpc.RpcError) as error:
        seeded_caller.get("../../etc/passwd")
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(violations(error.value)) == {"id"}


def test_internal_errors_leak_no_detail(make_server, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = make_server(workers=0)
    tenant = "t" + "x" * 8
    caller = Caller(broken, tenant)

    def failing_list(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("SELECT * FROM jobs WHERE secret = 'hunter2'")

    monkeypatch.setattr(broken.app.store, "list_page", failing_list)
    with pytest.raises(grpc.RpcError) as error:
        caller.list()
    assert error.value.code() == grpc.StatusCode.INTERNAL
    assert "SELECT" not in error.value.details() and "hunter2" not in error.value.details()
    assert error_reason(error.value) == "INTERNAL_ERROR"


# The format violation speaks the proto's language: the enum values a client sends (CSV, JSON), never
# Python's None or the service's lowercase spelling.

@pytest.mark.parametrize(("request_format", "description"), [
    # what a request without a format reads as
    (pb.ExportRequest.FORMAT_UNSPECIFIED, "is required: one of CSV, JSON, PARQUET"),
    (7, "must be one of CSV, JSON, PARQUET, got 7"),  # a newer client's value
])
def test_a_missing_or_unknown_format_names_the_enum_values(server: ServerHandle, tenant: str,
                                                           request_format: int, description: str) -> None:
    caller = Caller(server, tenant)
    request = pb.ExportRequest(format=request_format)  # type: ignore[arg-type]
    with pytest.raises(grpc.RpcError) as error:
        caller.stub.CreateUsersExportJob(request, metadata=caller.metadata)
    caller.close()
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(error.value) == {"format": description}
    assert error.value.details() == f"The export request is invalid: format: {description}"
    assert "None" not in error.value.details()
