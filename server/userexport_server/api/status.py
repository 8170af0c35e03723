"""Domain errors -> gRPC statuses with google.rpc details (AIP-193): ErrorInfo always, BadRequest for bad
input, QuotaFailure for a quota, RetryInfo when a retry may work."""
from __future__ import annotations

import datetime as dt

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from userexport_server.errors import InvalidArgument, QuotaExceeded, ServiceError, Unavailable

DOMAIN = "userexport.v1"


def to_grpc_status(error: ServiceError) -> grpc.Status:
    details: list[Message] = [error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=error.metadata)]
    if isinstance(error, InvalidArgument):
        details.append(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in error.violations]))
    if isinstance(error, QuotaExceeded):
        details.append(error_details_pb2.QuotaFailure(violations=[
            error_details_pb2.QuotaFailure.Violation(subject=error.subject, description=error.description)]))
    if isinstance(error, Unavailable):
        delay = duration_pb2.Duration()
        delay.FromTimedelta(dt.timedelta(seconds=error.retry_after_seconds))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    packed = []
    for detail in details:
        holder = any_pb2.Any()
        holder.Pack(detail)
        packed.append(holder)
    status = status_pb2.Status(code=getattr(code_pb2, error.code), message=error.message, details=packed)
    return rpc_status.to_status(status)
