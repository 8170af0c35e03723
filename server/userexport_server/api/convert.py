"""Proto <-> domain: the enums both ways, Job values into Job messages (api/requests.py checks requests)."""
from __future__ import annotations

import datetime as dt
from collections.abc import Callable

from google.protobuf import timestamp_pb2

from userexport.v1 import users_export_pb2 as pb
from userexport_server.export.spec import Format
from userexport_server.jobs.model import Job, JobStatus

FORMAT_FROM_PB = {pb.ExportRequest.CSV: Format.CSV, pb.ExportRequest.JSON: Format.JSON,
                  pb.ExportRequest.PARQUET: Format.PARQUET}
_FORMAT_TO_PB = {v: k for k, v in FORMAT_FROM_PB.items()}
_STATUS_TO_PB = {s: pb.Job.Status.Value(s.name) for s in JobStatus}
STATUS_FROM_PB = {v: k for k, v in _STATUS_TO_PB.items()}


def timestamp(value: dt.datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def job_message(job: Job, location: tuple[str, dt.datetime] | None = None, *,
                seal: Callable[[str], str]) -> pb.Job:
    """The Job message; `seal` makes a watermark (server form) the caller's text (requests.seal_watermark).
    A job's watermark is shown once it COMPLETED: before, its file does not exist."""
    watermark = job.watermark if job.status == JobStatus.COMPLETED and job.watermark else None
    message = pb.Job(
        id=job.id, type="users_export", status=_STATUS_TO_PB[job.status], created_at=timestamp(job.created_at),
        updated_at=timestamp(job.updated_at), connection_id=job.spec.connection_id or "",
        connection=job.connection_name or "", format=_FORMAT_TO_PB[job.spec.format],
        fields=[pb.Field(name=f.name, export_as=f.export_as or "") for f in job.spec.fields],
        percentage_done=job.percentage_done, users_written=job.users_written, users_total=job.users_total,
        error=job.error or "", expires_at=timestamp(job.expires_at), started_at=timestamp(job.started_at),
        finished_at=timestamp(job.finished_at), request_id=job.request_id or "", size_bytes=job.size_bytes,
        version=job.version, sha256=job.sha256 or "", watermark=seal(watermark) if watermark else "",
        changed_since=seal(job.spec.changed_since) if job.spec.changed_since else "",
        filter=job.spec.filter or "", status_details=job.status_details or "",
    )
    if job.spec.limit is not None:
        message.limit = job.spec.limit
    if job.time_left_seconds is not None:
        message.time_left_seconds = job.time_left_seconds
    if location is not None:
        message.location = location[0]
        message.location_expires_at.FromDatetime(location[1])
    return message
