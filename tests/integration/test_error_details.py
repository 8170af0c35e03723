"""Every error's google.rpc details (AIP-193), read as any gRPC client reads them: generated stubs on a
raw channel, `grpc-status-details-bin` decoded with grpc_status. ErrorInfo always, naming in its
metadata what the message names; BadRequest on every INVALID_ARGUMENT; QuotaFailure on a quota.

SQLite only, no workers (jobs stay pending): the details do not depend on the database.
"""
from __future__ import annotations

import pathlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest
from google.rpc import error_details_pb2

from tests.harness import ServerHandle, new_tenant
from tests.integration.support import UNKNOWN_FIELD_100, detail, raw_call
from userexport.v1 import users_export_pb2 as pb
from userexport.v1 import users_export_pb2_grpc as pb_grpc
from userexport_server.api.servicer import SERVICE

MISSING_JOB = "job_" + "Z" * 16


@dataclass
class Call:
    """One tenant's raw stub; `metadata` carries a read:users token."""

    server: ServerHandle
    channel: grpc.Channel
    stub: pb_grpc.UsersExportServiceStub
    tenant: str
    metadata: list[tuple[str, str]]


Prepared = tuple[dict[str, str], Callable[[], object]]


@dataclass(frozen=True)
class Case:
    code: grpc.StatusCode
    reason: str
    # Sets the case up; returns the ErrorInfo metadata the error must carry, and the failing call.
    prepare: Callable[[Call], Prepared]
    bad_fields: frozenset[str] = frozenset()  # the BadRequest field violations (INVALID_ARGUMENT only)


def _create(call: Call, **request: object) -> Callable[[], pb.Job]:
    export = pb.ExportRequest(format=pb.ExportRequest.CSV, **request)  # type: ignore[arg-type]
    return lambda: call.stub.CreateUsersExportJob(export, metadata=call.metadata)


def _job_not_found(call: Call) -> Prepared:
    return {"job_id": MISSING_JOB}, lambda: call.stub.GetJob(pb.GetJobRequest(id=MISSING_JOB), metadata=call.metadata)


def _bad_job_id(call: Call) -> Prepared:
    return {"field": "id"}, lambda: call.stub.CancelJob(pb.CancelJobRequest(id="job_1"), metadata=call.metadata)


def _bad_export(call: Call) -> Prepared:
    return {"field": "format, limit"}, lambda: call.stub.CreateUsersExportJob(pb.ExportRequest(limit=0),
                                                                               metadata=call.metadata)


def _listing(field: str, **request: object) -> Callable[[Call], Prepared]:
    listing = pb.ListJobsRequest(**request)  # type: ignore[arg-type]
    return lambda call: ({"field": field}, lambda: call.stub.ListJobs(listing, metadata=call.metadata))


def _raw_get(raw: bytes, field: str | None) -> Callable[[Call], Prepared]:
    def prepare(call: Call) -> Prepared:
        get = raw_call(call.channel, SERVICE.methods_by_name["GetJob"])
        return {"field": field} if field else {}, lambda: get(raw, metadata=call.metadata)
    return prepare


def _request_id_reused(call: Call) -> Prepared:
    first = _create(call, request_id="r-1")()
    return {"request_id": "r-1", "job_id": first.id}, _create(call, request_id="r-1", limit=5)


def _not_cancellable(call: Call) -> Prepared:
    job = _create(call)()
    call.stub.DeleteJob(pb.DeleteJobRequest(id=job.id), metadata=call.metadata)
    return {"job_id": job.id, "status": "EXPIRED"}, lambda: call.stub.CancelJob(pb.CancelJobRequest(id=job.id),
                                                                                 metadata=call.metadata)


def _too_many_active(call: Call) -> Prepared:
    _create(call)()
    return {"limit": "1", "active_jobs": "1"}, _create(call)


def _no_token(call: Call) -> Prepared:
    return {}, lambda: call.stub.GetJob(pb.GetJobRequest(id=MISSING_JOB))


def _missing_scope(call: Call) -> Prepared:
    weak = call.server.metadata(call.tenant, ("create:users",))
    return {"required_scopes": "read:users"}, lambda: call.stub.CancelJob(pb.CancelJobRequest(id=MISSING_JOB),
                                                                          metadata=weak)


INVALID = grpc.StatusCode.INVALID_ARGUMENT
CASES = {
    "job not found": Case(grpc.StatusCode.NOT_FOUND, "JOB_NOT_FOUND", _job_not_found),
    "malformed job id": Case(INVALID, "INVALID_ARGUMENT", _bad_job_id, frozenset({"id"})),
    "export request rules": Case(INVALID, "INVALID_ARGUMENT", _bad_export, frozenset({"format", "limit"})),
    "negative page size": Case(INVALID, "INVALID_PAGE_SIZE", _listing("page_size", page_size=-1),
                               frozenset({"page_size"})),
    "unknown status filter": Case(INVALID, "INVALID_STATUS_FILTER", _listing("status", status=42),
                                  frozenset({"status"})),
    "forged page token": Case(INVALID, "INVALID_PAGE_TOKEN", _listing("page_token", page_token="AAAA" * 12),
                              frozenset({"page_token"})),
    "control character": Case(INVALID, "INVALID_ARGUMENT", _listing("page_token", page_token="a\tb"),
                              frozenset({"page_token"})),
    "unknown field": Case(INVALID, "UNKNOWN_FIELDS",
                          _raw_get(pb.GetJobRequest(id=MISSING_JOB).SerializeToString() + UNKNOWN_FIELD_100, "100"),
                          frozenset({"100"})),
    "undecodable bytes": Case(INVALID, "MALFORMED_REQUEST", _raw_get(b"\xff\xff\xff", None), frozenset({""})),
    "request_id reused": Case(grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED", _request_id_reused),
    "not cancellable": Case(grpc.StatusCode.FAILED_PRECONDITION, "JOB_NOT_CANCELLABLE", _not_cancellable),
    "active jobs limit": Case(grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_ACTIVE_JOBS", _too_many_active),
    "no token": Case(grpc.StatusCode.UNAUTHENTICATED, "MISSING_TOKEN", _no_token),
    "missing scope": Case(grpc.StatusCode.PERMISSION_DENIED, "INSUFFICIENT_SCOPE", _missing_scope),
}


@pytest.fixture(scope="module")
def idle_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    server = ServerHandle(pathlib.Path(tmp_path_factory.mktemp("details")), workers=0, max_active_jobs_per_tenant=1)
    yield server
    server.stop()


@pytest.mark.parametrize("name", CASES, ids=list(CASES))
def test_each_error_carries_its_details(idle_server: ServerHandle, name: str) -> None:
    case, tenant = CASES[name], new_tenant()
    idle_server.seed(1, tenant=tenant)
    with grpc.insecure_channel(idle_server.target) as channel:
        call = Call(idle_server, channel, pb_grpc.UsersExportServiceStub(channel), tenant,
                    idle_server.metadata(tenant))
        expected_metadata, failing = case.prepare(call)
        with pytest.raises(grpc.RpcError) as raised:
            failing()
    error = raised.value
    assert error.code() == case.code, error.details()
    info = detail(error, error_details_pb2.ErrorInfo)
    assert info is not None and (info.reason, info.domain) == (case.reason, "userexport.v1")
    assert dict(info.metadata) == expected_metadata
    bad = detail(error, error_details_pb2.BadRequest)
    assert {v.field for v in bad.field_violations} == case.bad_fields if bad else not case.bad_fields
    assert (bad is not None) == (case.code == INVALID)
    quota = detail(error, error_details_pb2.QuotaFailure)
    assert (quota is not None) == (case.code == grpc.StatusCode.RESOURCE_EXHAUSTED)
    if quota is not None:
        assert quota.violations[0].subject == f"tenant:{tenant}" and "1 of 1" in quota.violations[0].description
