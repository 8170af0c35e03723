"""The job as an immutable value: what the store returns, the bus carries and the API renders."""
from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import secrets
import string
from dataclasses import dataclass
from typing import Any, overload

from userexport_server.export.spec import ExportSpec, FieldSpec, Format

_ID_ALPHABET = string.ascii_letters + string.digits


class JobStatus(enum.StrEnum):
    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL

    @property
    def is_active(self) -> bool:
        return self in ACTIVE


ACTIVE = frozenset({JobStatus.PENDING, JobStatus.PROCESSING})
TERMINAL = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.EXPIRED})


def new_job_id() -> str:
    return "job_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(16))


@overload
def utc(value: dt.datetime) -> dt.datetime: ...
@overload
def utc(value: None) -> None: ...
def utc(value: dt.datetime | None) -> dt.datetime | None:
    """SQLite hands back naive datetimes; everything stored is UTC, so say so."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=dt.UTC)


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True, slots=True)
class Job:
    id: str
    tenant: str
    status: JobStatus
    version: int
    spec: ExportSpec
    connection_name: str | None
    created_at: dt.datetime
    updated_at: dt.datetime
    expires_at: dt.datetime
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    users_total: int = 0
    users_written: int = 0
    percentage_done: int = 0
    time_left_seconds: int | None = None
    error: str | None = None
    storage_key: str | None = None
    request_id: str | None = None
    lease_owner: str | None = None
    attempts: int = 0
    size_bytes: int = 0
    trace_parent: str | None = None
    watermark: str | None = None
    sha256: str | None = None
    status_details: str | None = None

    @classmethod
    def from_row(cls, row: Any) -> Job:
        spec = ExportSpec(
            format=Format(row.format),
            fields=tuple(FieldSpec(f["name"], f.get("export_as") or None) for f in row.fields),
            connection_id=row.connection_id,
            limit=row.limit,
            changed_since=row.changed_since,
            filter=row.filter,
        )
        return cls(
            id=row.id, tenant=row.tenant, status=JobStatus(row.status), version=row.version, spec=spec,
            connection_name=row.connection_name, created_at=utc(row.created_at), updated_at=utc(row.updated_at),
            expires_at=utc(row.expires_at), started_at=utc(row.started_at), finished_at=utc(row.finished_at),
            users_total=row.users_total, users_written=row.users_written, percentage_done=row.percentage_done,
            time_left_seconds=row.time_left_seconds, error=row.error, storage_key=row.storage_key,
            request_id=row.request_id, lease_owner=row.lease_owner, attempts=row.attempts,
            size_bytes=row.size_bytes, trace_parent=row.trace_parent,
            watermark=row.watermark, sha256=row.sha256, status_details=row.status_details,
        )

    def evolve(self, **changes: Any) -> Job:
        return dataclasses.replace(self, **changes)

    @property
    def filename(self) -> str:
        return self.tenant + self.spec.file_suffix


def fields_to_json(spec: ExportSpec) -> list[dict[str, str]]:
    return [{"name": f.name, **({"export_as": f.export_as} if f.export_as else {})} for f in spec.fields]
