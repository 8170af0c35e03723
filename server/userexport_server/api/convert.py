"""Proto <-> domain: requests into plain values, Job values into Job messages."""
from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import TypeVar

from google.protobuf import timestamp_pb2, unknown_fields
from google.protobuf.message import DecodeError, Message

from userexport.v1 import users_export_pb2 as pb
from userexport_server.errors import InvalidArgument, Violation
from userexport_server.export.spec import Format
from userexport_server.identifiers import control_character
from userexport_server.jobs.model import Job, JobStatus

_FORMATS = {pb.ExportRequest.CSV: Format.CSV, pb.ExportRequest.JSON: Format.JSON}
_FORMAT_TO_PB = {v: k for k, v in _FORMATS.items()}
_STATUS_TO_PB = {s: pb.Job.Status.Value(s.name) for s in JobStatus}
_STATUS_FROM_PB = {v: k for k, v in _STATUS_TO_PB.items()}
M = TypeVar("M", bound=Message)


def parse_request(message_class: type[M], raw: bytes) -> M:
    """The request decoded from its wire bytes, refused whole (INVALID_ARGUMENT) when the bytes are not
    such a message (invalid UTF-8 included), carry fields this server does not know, or hold text
    with control characters."""
    try:
        request = message_class.FromString(raw)
    except DecodeError as exc:
        raise InvalidArgument(f"The request is not a valid {message_class.DESCRIPTOR.full_name} message.",
                              reason="MALFORMED_REQUEST") from exc
    reject_unknown_fields(request)
    violations = list(_control_characters(request))
    if violations:
        raise InvalidArgument("The request has control characters in " + ", ".join(v.field for v in violations)
                              + ".", violations=violations)
    return request


def reject_unknown_fields(message: Message) -> None:
    """Fields this server does not know would be silently dropped by protobuf; refuse them instead."""
    if len(unknown_fields.UnknownFieldSet(message)):
        raise InvalidArgument("The request has fields this server does not know; update the server or the "
                              "client so both use the same API version.", reason="UNKNOWN_FIELDS")
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        for item in value if field.is_repeated else (value,):
            reject_unknown_fields(item)


def _control_characters(message: Message, prefix: str = "") -> Iterator[Violation]:
    """A violation for each string field, at any depth, that holds a control character."""
    for field, value in message.ListFields():
        items = [(f"{prefix}{field.name}[{i}]", v) for i, v in enumerate(value)] if field.is_repeated \
            else [(prefix + field.name, value)]
        for where, item in items:
            if isinstance(item, Message):
                yield from _control_characters(item, where + ".")
            elif isinstance(item, str) and (found := control_character(item)) is not None:
                yield Violation(where, f"must not contain control characters (found {found})")


def format_of(value: int) -> str | None:
    """The proto enum as the request's format text; None when unset, the number when unknown (a
    newer client's value), so that validation can tell the caller which."""
    if value == pb.ExportRequest.FORMAT_UNSPECIFIED:
        return None
    fmt = _FORMATS.get(value)  # type: ignore[call-overload]
    return fmt.value if fmt else str(value)


def status_filter(value: int) -> JobStatus | None:
    if value == pb.Job.STATUS_UNSPECIFIED:
        return None
    if value not in _STATUS_FROM_PB:
        raise InvalidArgument(f"Unknown status filter {value}.", reason="INVALID_STATUS_FILTER")
    return _STATUS_FROM_PB[value]


def timestamp(value: dt.datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def job_message(job: Job, location: tuple[str, dt.datetime] | None = None) -> pb.Job:
    message = pb.Job(
        id=job.id, type="users_export", status=_STATUS_TO_PB[job.status], created_at=timestamp(job.created_at),
        updated_at=timestamp(job.updated_at), connection_id=job.spec.connection_id or "",
        connection=job.connection_name or "", format=_FORMAT_TO_PB[job.spec.format],
        fields=[pb.Field(name=f.name, export_as=f.export_as or "") for f in job.spec.fields],
        percentage_done=job.percentage_done, users_written=job.users_written, users_total=job.users_total,
        error=job.error or "", expires_at=timestamp(job.expires_at), started_at=timestamp(job.started_at),
        finished_at=timestamp(job.finished_at), request_id=job.request_id or "", size_bytes=job.size_bytes,
        version=job.version,
    )
    if job.spec.limit is not None:
        message.limit = job.spec.limit
    if job.time_left_seconds is not None:
        message.time_left_seconds = job.time_left_seconds
    if location is not None:
        message.location = location[0]
        message.location_expires_at.FromDatetime(location[1])
    return message
