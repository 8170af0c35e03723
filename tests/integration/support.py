"""What integration tests share: stubs with a tenant's token, watching to the end, downloading, reading
error details, tokens of any claims, raw requests."""
from __future__ import annotations

import gzip
import time
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import grpc
import jwt
import pytest
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tests.harness import ServerHandle
from userexport.v1 import users_export_pb2 as pb
from userexport.v1 import users_export_pb2_grpc as pb_grpc
from userexport_server.api.servicer import SERVICE

_Detail = TypeVar("_Detail", bound=Message)
T = TypeVar("T")
TERMINAL = {pb.Job.COMPLETED, pb.Job.FAILED, pb.Job.CANCELLED, pb.Job.EXPIRED}


class Caller:
    """A tenant's view of the API: every call carries that tenant's bearer token."""

    def __init__(self, server: ServerHandle, tenant: str, scopes: Sequence[str] = ("read:users",)) -> None:
        self.channel = grpc.insecure_channel(server.target)
        self.stub = pb_grpc.UsersExportServiceStub(self.channel)
        self.metadata = server.metadata(tenant, scopes)

    def create(self, **request: Any) -> pb.Job:
        fields = [pb.Field(name=n, export_as=a) for n, a in request.pop("fields", [])]
        return self.stub.CreateUsersExportJob(pb.ExportRequest(fields=fields, **request), metadata=self.metadata)

    def get(self, job_id: str) -> pb.Job:
        return self.stub.GetJob(pb.GetJobRequest(id=job_id), metadata=self.metadata)

    def watch(self, job_id: str, timeout: float = 120) -> list[pb.Job]:
        return list(self.stub.WatchJob(pb.WatchJobRequest(id=job_id), metadata=self.metadata, timeout=timeout))

    def cancel(self, job_id: str) -> pb.Job:
        return self.stub.CancelJob(pb.CancelJobRequest(id=job_id), metadata=self.metadata)

    def list(self, **request: Any) -> pb.ListJobsResponse:
        return self.stub.ListJobs(pb.ListJobsRequest(**request), metadata=self.metadata)

    def finish(self, job_id: str, timeout: float = 120) -> pb.Job:
        """Watch until the stream ends; returns the final message."""
        messages = self.watch(job_id, timeout)
        assert messages[-1].status in TERMINAL, messages[-1]
        return messages[-1]

    def close(self) -> None:
        self.channel.close()


def download(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return gzip.decompress(response.read())


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def detail(error: grpc.RpcError, kind: type[_Detail]) -> _Detail | None:
    """The error's google.rpc detail of type `kind` (ErrorInfo, BadRequest, QuotaFailure ...), if any."""
    status = rpc_status.from_call(error)
    for packed in status.details if status else ():
        if packed.Is(kind.DESCRIPTOR):
            found = kind()
            packed.Unpack(found)
            return found
    return None


def violations(error: grpc.RpcError) -> dict[str, str]:
    """The google.rpc.BadRequest field violations of an error, by field."""
    bad = detail(error, error_details_pb2.BadRequest)
    return {v.field: v.description for v in bad.field_violations} if bad else {}


def error_reason(error: grpc.RpcError) -> str | None:
    info = detail(error, error_details_pb2.ErrorInfo)
    return info.reason if info else None


def sign_claims(claims: dict[str, Any], key: Any, algorithm: str, headers: dict[str, Any] | None = None) -> str:
    """A JWT of any claims and header values, signed as given: PyJWT's encoders refuse some wrong types
    (a list `iss`, a number `kid`), and tests need to send them."""
    import base64
    import json

    def segment(value: dict[str, Any]) -> bytes:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=")

    signer = jwt.algorithms.get_default_algorithms()[algorithm]
    signing_input = segment({"alg": algorithm, "typ": "JWT", **(headers or {})}) + b"." + segment(claims)
    signature = base64.urlsafe_b64encode(signer.sign(signing_input, signer.prepare_key(key))).rstrip(b"=")
    return (signing_input + b"." + signature).decode()


SECRET_CLAIMS = {"iss": "userexport-local", "aud": "userexport", "scope": "read:users"}


def call_get(server: ServerHandle, metadata: list[tuple[str, str]] | None) -> grpc.RpcError:
    stub = pb_grpc.UsersExportServiceStub(grpc.insecure_channel(server.target))
    with pytest.raises(grpc.RpcError) as error:
        stub.GetJob(pb.GetJobRequest(id="job_" + "A" * 16), metadata=metadata)
    return error.value


def hs256(server: ServerHandle, secret: bytes | None = None, **claims: Any) -> list[tuple[str, str]]:
    now = int(time.time())
    body = {**SECRET_CLAIMS, "tenant": "acme", "iat": now, "nbf": now, "exp": now + 300, **claims}
    body = {k: v for k, v in body.items() if v is not None}
    key = secret if secret is not None else (server.data_dir / "jwt_secret").read_bytes()
    return [("authorization", "Bearer " + jwt.encode(body, key, algorithm="HS256"))]


UNKNOWN_FIELD_100 = b"\xa0\x06\x01"  # field 100, varint 1


def raw_call(channel: grpc.Channel, method: MethodDescriptor) -> Callable[..., Any]:
    """The RPC with the request sent as the given bytes, the reply read as the real response type."""
    path = f"/{SERVICE.full_name}/{method.name}"
    response = GetMessageClass(method.output_type).FromString
    make = channel.unary_stream if method.server_streaming else channel.unary_unary
    return make(path, request_serializer=lambda raw: raw, response_deserializer=response)


def wait_until_writing(caller: Caller, job_id: str) -> None:
    """Watch the job until it is PROCESSING and has written users; fail if it ends first."""
    for message in caller.stub.WatchJob(pb.WatchJobRequest(id=job_id), metadata=caller.metadata, timeout=60):
        if message.status == pb.Job.PROCESSING and message.users_written > 0:
            return
    raise AssertionError(f"job {job_id} ended before it wrote anything")
