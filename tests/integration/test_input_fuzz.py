"""Property-based fuzzing of a real server: whatever the request fields, raw bytes or token claims,
the answer is a deliberate status (INVALID_ARGUMENT, UNAUTHENTICATED, NOT_FOUND, ...), never
INTERNAL or UNKNOWN (an unhandled error)."""
from __future__ import annotations

import base64
import string
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.harness import ServerHandle, new_tenant
from tests.integration.support import raw_call, sign_claims
from userexport.v1 import users_export_pb2 as pb
from userexport.v1 import users_export_pb2_grpc as pb_grpc
from userexport_server.api.servicer import SERVICE

UNHANDLED = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
INT64 = st.integers(-(2**63), 2**63 - 1)
INT32 = st.integers(-(2**31), 2**31 - 1)
ALNUM = string.ascii_letters + string.digits


def near(prefix: str, size: int) -> st.SearchStrategy[str]:
    """Identifiers that almost match: the right shape plus arbitrary text (newlines, unicode) around it."""
    good = st.text(ALNUM, min_size=size, max_size=size).map(lambda s: prefix + s)
    return st.one_of(st.text(), good, st.tuples(good, st.text(max_size=3)).map("".join),
                     st.tuples(st.text(max_size=3), good).map("".join))


JSON = st.recursive(st.none() | st.booleans() | INT64 | st.integers() | st.floats() | st.text(),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                    max_leaves=6)


def code_of(call: Callable[[], Any]) -> grpc.StatusCode:
    try:
        result = call()
        if isinstance(result, Iterator):
            list(result)
        return grpc.StatusCode.OK
    except grpc.RpcError as error:
        return error.code()


@pytest.fixture(scope="module")
def stub(server: ServerHandle) -> pb_grpc.UsersExportServiceStub:
    return pb_grpc.UsersExportServiceStub(grpc.insecure_channel(server.target))


@FUZZ
@given(format=st.one_of(st.sampled_from([0, 1, 2]), INT32), connection_id=st.none() | near("con_", 16),
       limit=st.none() | INT64, request_id=st.one_of(st.text(), near("", 12)),
       fields=st.lists(st.tuples(st.one_of(st.text(), st.sampled_from(["email", "user_metadata.a", "identities[0]"])),
                                 st.text(max_size=110)), max_size=32))
def test_no_export_request_is_unhandled(server: ServerHandle, stub: pb_grpc.UsersExportServiceStub, format: int,
                                        connection_id: str | None, limit: int | None, request_id: str,
                                        fields: list[tuple[str, str]]) -> None:
    request = pb.ExportRequest(format=format, request_id=request_id,  # type: ignore[arg-type]
                               fields=[pb.Field(name=n, export_as=a) for n, a in fields])
    if connection_id is not None:
        request.connection_id = connection_id
    if limit is not None:
        request.limit = limit
    metadata = server.metadata(new_tenant())
    assert code_of(lambda: stub.CreateUsersExportJob(request, metadata=metadata, timeout=20)) not in UNHANDLED


@FUZZ
@given(job_id=near("job_", 16), rpc=st.sampled_from(["GetJob", "WatchJob", "CancelJob", "DeleteJob"]))
def test_no_job_id_is_unhandled(server: ServerHandle, stub: pb_grpc.UsersExportServiceStub, job_id: str,
                                rpc: str) -> None:
    request_class = {"GetJob": pb.GetJobRequest, "WatchJob": pb.WatchJobRequest, "CancelJob": pb.CancelJobRequest,
                     "DeleteJob": pb.DeleteJobRequest}[rpc]
    method = getattr(stub, rpc)
    metadata = server.metadata()
    assert code_of(lambda: method(request_class(id=job_id), metadata=metadata, timeout=5)) not in UNHANDLED


@FUZZ
@given(page_size=INT32, status=st.one_of(st.sampled_from(range(7)), INT32),
       page_token=st.one_of(st.text(), st.binary(max_size=80).map(
           lambda b: base64.urlsafe_b64encode(b).decode().rstrip("="))))
def test_no_list_request_is_unhandled(server: ServerHandle, stub: pb_grpc.UsersExportServiceStub, page_size: int,
                                      status: int, page_token: str) -> None:
    request = pb.ListJobsRequest(page_size=page_size, status=status, page_token=page_token)  # type: ignore[arg-type]
    metadata = server.metadata()
    assert code_of(lambda: stub.ListJobs(request, metadata=metadata, timeout=10)) not in UNHANDLED


@FUZZ
@given(method=st.sampled_from(list(SERVICE.methods)), raw=st.binary(max_size=200))
def test_no_request_bytes_are_unhandled(server: ServerHandle, method: Any, raw: bytes) -> None:
    channel = grpc.insecure_channel(server.target)
    try:
        call = raw_call(channel, method)
        assert code_of(lambda: call(raw, metadata=server.metadata(), timeout=5)) not in UNHANDLED
    finally:
        channel.close()


def claim(good: Any) -> st.SearchStrategy[Any]:
    """A claim's value: absent (None is dropped), the good value, or any JSON value."""
    return st.one_of(st.just(good), st.none(), JSON)


@FUZZ
@given(data=st.data())
def test_no_token_claims_are_unhandled(server: ServerHandle, stub: pb_grpc.UsersExportServiceStub,
                                       data: st.DataObject) -> None:
    now = int(time.time())
    claims = {
        "tenant": data.draw(claim("acme") | near("", 8)), "scope": data.draw(claim("read:users")),
        "permissions": data.draw(claim(["read:users"])), "exp": data.draw(claim(now + 60)),
        "nbf": data.draw(claim(now)), "iat": data.draw(claim(now)), "iss": data.draw(claim(server.settings.jwt_issuer)),
        "aud": data.draw(claim(server.settings.jwt_audience)), "sub": data.draw(claim("user-1")),
    }
    headers = {"kid": data.draw(JSON)} if data.draw(st.booleans()) else None
    secret = (server.data_dir / "jwt_secret").read_bytes()
    token = sign_claims({k: v for k, v in claims.items() if v is not None}, secret, "HS256", headers=headers)
    metadata = [("authorization", f"Bearer {token}")]
    request = pb.GetJobRequest(id="job_" + "A" * 16)
    assert code_of(lambda: stub.GetJob(request, metadata=metadata, timeout=10)) not in UNHANDLED
