"""Bad input on a real server: each gets a clear gRPC error, and nothing is created."""
from __future__ import annotations

import grpc
import pytest

from tests.harness import ServerHandle
from tests.integration.support import Caller, error_reason, violations
from userexport.v1 import users_export_pb2 as pb


@pytest.fixture
def caller(server: ServerHandle, tenant: str) -> Caller:
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
def test_each_rule_is_invalid_argument_with_its_violation(caller: Caller, case: str) -> None:
    request, fields = CASES[case]
    error = rejected(caller, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(violations(error)) == fields, violations(error)
    assert error_reason(error) == "INVALID_ARGUMENT"


def test_all_violations_are_reported_at_once(caller: Caller) -> None:
    error = rejected(caller, pb.ExportRequest(connection_id="nope", limit=0,
                                              fields=[pb.Field(name=""), pb.Field(name="email", export_as="y" * 200)]))
    assert set(violations(error)) == {"format", "connection_id", "limit", "fields[0].name", "fields[1].export_as"}
    assert "connection_id" in error.details()


def test_unknown_request_fields_are_rejected(caller: Caller) -> None:
    raw = pb.ExportRequest(format=pb.ExportRequest.CSV).SerializeToString() + b"\xa0\x06\x01"  # field 100
    call = caller.channel.unary_unary("/userexport.v1.UsersExportService/CreateUsersExportJob",
                                      request_serializer=lambda b: b, response_deserializer=pb.Job.FromString)
    with pytest.raises(grpc.RpcError) as error:
        call(raw, metadata=caller.metadata)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(error.value) == "UNKNOWN_FIELDS"
    assert list(caller.list().jobs) == []


def test_oversize_request_is_refused_by_grpc(caller: Caller) -> None:
    huge = pb.ExportRequest(format=pb.ExportRequest.CSV, request_id="x" * 200_000)
    error = rejected(caller, huge)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_unknown_job_is_not_found(caller: Caller) -> None:
    for call in (caller.get, caller.cancel, caller.watch):
        with pytest.raises(grpc.RpcError) as error:
            call("job_" + "Z" * 16)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
        assert error_reason(error.value) == "JOB_NOT_FOUND"


def test_malformed_job_id_is_invalid_argument(caller: Caller) -> None:
    with pytest.raises(grpc.RpcError) as error:
        caller.get("../../etc/passwd")
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
