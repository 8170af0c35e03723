"""Hostile bytes and text on a real server: each ends as a clean INVALID_ARGUMENT or UNAUTHENTICATED,
logs no traceback, and repeats are logged at a bounded rate."""
from __future__ import annotations

import gzip
import logging
import urllib.request
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message_factory import GetMessageClass

from tests.harness import ServerHandle
from tests.integration.support import Caller, error_reason, violations
from tests.integration.test_auth import call_get, hs256
from userexport.v1 import users_export_pb2 as pb
from userexport_server.api.servicer import SERVICE
from userexport_server.logs import EventLog, RateLimitedLog

METHODS = list(SERVICE.methods)
UNKNOWN_FIELD_100 = b"\xa0\x06\x01"  # field 100, varint 1
A_JOB = "job_" + "A" * 16


def raw_call(channel: grpc.Channel, method: MethodDescriptor) -> Callable[..., Any]:
    """The RPC with the request sent as the given bytes, the reply read as the real response type."""
    path = f"/{SERVICE.full_name}/{method.name}"
    response = GetMessageClass(method.output_type).FromString
    make = channel.unary_stream if method.server_streaming else channel.unary_unary
    return make(path, request_serializer=lambda raw: raw, response_deserializer=response)


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


def test_the_rate_limited_log_says_how_many_lines_it_left_out(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    limited = RateLimitedLog(EventLog("test.limited"), limit=3, window=60, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="test.limited"):
        for i in range(50):
            limited.log(logging.INFO, "k", "line", n=i)
        limited.log(logging.INFO, "other", "another key is counted apart")
        now[0] = 61.0
        limited.log(logging.INFO, "k", "after the window")
    messages = [r.getMessage() for r in caplog.records]
    assert messages[:3] == ["line n=0", "line n=1", "line n=2"]
    assert "log rate limit reached key=k" in messages[3]
    assert messages[4] == "another key is counted apart"
    assert messages[5].startswith("log lines suppressed key=k count=47")
    assert messages[6:] == ["after the window"]


# Paths no user has (a typo in a root, `emial`, is refused instead: tests/integration/test_bad_input.py).
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
