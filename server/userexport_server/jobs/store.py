"""The job store: the one owner of every job query, on SQLite and PostgreSQL alike.

Every change bumps the job's `version` and, once committed, is published on the event bus.
Worker-side changes are conditional on the worker still holding the job (status processing and
its lease), so a job cancelled, expired or re-claimed meanwhile is never overwritten.
"""
from __future__ import annotations

import builtins
import datetime as dt
import hashlib
import logging
from dataclasses import dataclass
from typing import Any, cast

import orjson
from sqlalchemy import Connection, Engine, Table, and_, delete, func, or_, select, update

from userexport_server.db.engine import reading, write_transaction
from userexport_server.db.models import Connection as ConnectionRow
from userexport_server.db.models import Job as JobRow
from userexport_server.errors import AlreadyExists, FailedPrecondition, QuotaExceeded
from userexport_server.export.spec import ExportSpec
from userexport_server.jobs.events import EventBus
from userexport_server.jobs.model import ACTIVE, Job, JobStatus, fields_to_json, new_job_id, now_utc
from userexport_server.logs import EventLog

log = EventLog(__name__)
JOBS = cast(Table, JobRow.__table__)


@dataclass(frozen=True, slots=True)
class Limits:
    job_ttl: dt.timedelta = dt.timedelta(hours=24)
    job_timeout: dt.timedelta = dt.timedelta(hours=8)
    expired_retention: dt.timedelta = dt.timedelta(days=7)
    lease: dt.timedelta = dt.timedelta(seconds=30)
    max_active_per_tenant: int = 2
    # Bytes of completed export files a tenant may keep at once (0: no limit).
    max_retained_bytes_per_tenant: int = 5 * 1024**3


def request_fingerprint(tenant: str, spec: ExportSpec) -> str:
    """What makes two creates "the same request" for idempotency."""
    body = {"c": spec.connection_id, "f": spec.format.value, "l": spec.limit, "fields": fields_to_json(spec)}
    # Only when set, so the fingerprints of requests without them stay what they were.
    body |= {k: v for k, v in (("since", spec.changed_since), ("filter", spec.filter)) if v is not None}
    return hashlib.sha256(tenant.encode() + b"\0" + orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


class JobStore:
    def __init__(self, engine: Engine, bus: EventBus, limits: Limits = Limits()) -> None:
        self.engine = engine
        self.bus = bus
        self.limits = limits

    # --- reads -------------------------------------------------------------------------------

    def get(self, tenant: str, job_id: str) -> Job | None:
        with reading(self.engine) as conn:
            row = conn.execute(select(JOBS).where(JOBS.c.id == job_id, JOBS.c.tenant == tenant)).first()
        return Job.from_row(row) if row else None

    def get_any(self, job_id: str) -> Job | None:
        """For internal use only (events across replicas): no tenant check."""
        with reading(self.engine) as conn:
            row = conn.execute(select(JOBS).where(JOBS.c.id == job_id)).first()
        return Job.from_row(row) if row else None

    def connection_name(self, tenant: str, connection_id: str) -> str | None:
        with reading(self.engine) as conn:
            return conn.execute(
                select(ConnectionRow.name).where(ConnectionRow.tenant == tenant, ConnectionRow.id == connection_id)
            ).scalar()

    def list_page(self, tenant: str, *, page_size: int, cursor: tuple[dt.datetime, str] | None,
             status: JobStatus | None) -> tuple[builtins.list[Job], bool]:
        """Newest first; returns the page and whether more follow."""
        query = select(JOBS).where(JOBS.c.tenant == tenant)
        if status is not None:
            query = query.where(JOBS.c.status == status.value)
        if cursor is not None:
            created, job_id = cursor
            query = query.where(or_(JOBS.c.created_at < created,
                                    and_(JOBS.c.created_at == created, JOBS.c.id < job_id)))
        query = query.order_by(JOBS.c.created_at.desc(), JOBS.c.id.desc()).limit(page_size + 1)
        with reading(self.engine) as conn:
            rows = conn.execute(query).all()
        return [Job.from_row(r) for r in rows[:page_size]], len(rows) > page_size

    def count_by_status(self) -> dict[str, int]:
        """Jobs of every tenant by status (every status, zero included), for metrics: one GROUP BY over
        the status index."""
        with reading(self.engine) as conn:
            rows = conn.execute(select(JOBS.c.status, func.count()).group_by(JOBS.c.status)).all()
        return {status.value: 0 for status in JobStatus} | {status: count for status, count in rows}

    # --- API-side changes ----------------------------------------------------------------------

    def create(self, tenant: str, spec: ExportSpec, *, connection_name: str | None,
               request_id: str | None = None, trace_parent: str | None = None) -> tuple[Job, bool]:
        """Insert a pending job; returns (job, created). A known request_id returns its first job."""
        now = now_utc()
        fingerprint = request_fingerprint(tenant, spec) if request_id else None
        with write_transaction(self.engine, lock_key=f"tenant:{tenant}") as conn:
            if request_id:
                existing = conn.execute(select(JOBS).where(JOBS.c.tenant == tenant,
                                                           JOBS.c.request_id == request_id)).first()
                if existing is not None and existing.status != JobStatus.EXPIRED:
                    if existing.request_hash != fingerprint:
                        raise AlreadyExists(
                            f"request_id {request_id!r} was already used for a different export request "
                            f"(job {existing.id}).", metadata={"request_id": request_id, "job_id": existing.id})
                    return Job.from_row(existing), False
                if existing is not None:  # the first job expired: the key may start a new one
                    conn.execute(update(JOBS).where(JOBS.c.id == existing.id).values(request_id=None))
            active = conn.execute(select(func.count()).select_from(JOBS).where(
                JOBS.c.tenant == tenant, JOBS.c.status.in_([s.value for s in ACTIVE]))).scalar_one()
            limit = self.limits.max_active_per_tenant
            if active >= limit:
                raise QuotaExceeded(
                    f"Too many export jobs: at most {limit} may be pending or processing per tenant at once, "
                    f"and this tenant has {active}. Wait for one to finish.", reason="TOO_MANY_ACTIVE_JOBS",
                    tenant=tenant, description=f"pending or processing export jobs: {active} of {limit}",
                    metadata={"limit": str(limit), "active_jobs": str(active)})
            self._check_retained_bytes(conn, tenant)
            values = dict(
                id=new_job_id(), tenant=tenant, status=JobStatus.PENDING.value, version=1,
                format=spec.format.value, connection_id=spec.connection_id, connection_name=connection_name,
                limit=spec.limit, fields=fields_to_json(spec), request_id=request_id or None,
                request_hash=fingerprint, created_at=now, updated_at=now, expires_at=now + self.limits.job_ttl,
                users_total=0, users_written=0, percentage_done=0, attempts=0, trace_parent=trace_parent,
                changed_since=spec.changed_since, filter=spec.filter,
            )
            row = conn.execute(JOBS.insert().values(**values).returning(*JOBS.c)).one()
        job = Job.from_row(row)
        log.info("job created", job_id=job.id, tenant=tenant, request_id=request_id, format=spec.format.value,
                 connection_id=spec.connection_id, limit=spec.limit, fields=len(spec.fields))
        self.bus.deliver(job)
        return job, True

    def cancel(self, tenant: str, job_id: str) -> Job | None:
        """Cancel a pending or processing job; a cancelled job is returned as it is (idempotent)."""
        with write_transaction(self.engine) as conn:
            row = conn.execute(select(JOBS).where(JOBS.c.id == job_id, JOBS.c.tenant == tenant)).first()
            if row is None:
                return None
            status = JobStatus(row.status)
            if status == JobStatus.CANCELLED:
                return Job.from_row(row)
            if status.is_terminal:
                raise FailedPrecondition(f"Job {job_id} is already {status.value} and cannot be cancelled.",
                                         metadata={"job_id": job_id, "status": status.name})
            row = change_row(conn, job_id, {"status": JobStatus.CANCELLED.value, "finished_at": now_utc(),
                                              "lease_owner": None, "lease_expires_at": None,
                                              "time_left_seconds": None})
        return self.publish(row, "job cancelled")

    def revoke(self, tenant: str, job_id: str) -> Job | None:
        """DeleteJob: the job becomes EXPIRED now, keeping its storage key until the file is gone
        (the caller deletes it; if that fails the reaper retries). An expired job is returned as it is."""
        with write_transaction(self.engine) as conn:
            row = conn.execute(select(JOBS).where(JOBS.c.id == job_id, JOBS.c.tenant == tenant)).first()
            if row is None or row.status == JobStatus.EXPIRED.value:
                return None if row is None else Job.from_row(row)
            row = change_row(conn, job_id, {"status": JobStatus.EXPIRED.value, "lease_owner": None,
                                              "lease_expires_at": None, "time_left_seconds": None,
                                              "finished_at": row.finished_at or now_utc(), "expires_at": now_utc()})
        return self.publish(row, "job revoked")

    def forget_file(self, job_id: str, key: str) -> None:
        """The file at `key` is deleted: clear the job's key (if it still names that file), so that
        nothing signs, counts or deletes it again. Not an event: watchers see no change."""
        with write_transaction(self.engine) as conn:
            conn.execute(update(JOBS).where(JOBS.c.id == job_id, JOBS.c.storage_key == key)
                         .values(storage_key=None, size_bytes=0))

    def _check_retained_bytes(self, conn: Connection, tenant: str) -> None:
        """Refuse a new export while the tenant's completed files already fill its quota."""
        limit = self.limits.max_retained_bytes_per_tenant
        if not limit:
            return
        retained = conn.execute(select(func.coalesce(func.sum(JOBS.c.size_bytes), 0)).where(
            JOBS.c.tenant == tenant, JOBS.c.status == JobStatus.COMPLETED.value,
            JOBS.c.storage_key.is_not(None))).scalar_one()
        if retained >= limit:
            raise QuotaExceeded(
                f"This tenant keeps {retained} bytes of completed export files, and at most {limit} are "
                f"allowed. Delete jobs you no longer need (DeleteJob) or wait for them to expire.",
                reason="RETAINED_BYTES_QUOTA_EXCEEDED", tenant=tenant,
                description=f"retained export bytes: {retained} of {limit}",
                metadata={"limit_bytes": str(limit), "retained_bytes": str(retained)})

    # --- worker-side changes -------------------------------------------------------------------

    def claim(self, owner: str) -> Job | None:
        """Take the oldest pending job to plan, or a processing one whose planner or assembler stopped
        renewing its lease (its progress stays: finished slices are kept, see jobs/slices.py)."""
        now = now_utc()
        with write_transaction(self.engine) as conn:
            candidate = conn.execute(
                select(JOBS.c.id, JOBS.c.status).where(or_(
                    JOBS.c.status == JobStatus.PENDING.value,
                    and_(JOBS.c.status == JobStatus.PROCESSING.value, JOBS.c.lease_expires_at < now)))
                .order_by(JOBS.c.created_at).limit(1).with_for_update(skip_locked=True)
            ).first()
            if candidate is None:
                return None
            row = change_row(conn, candidate.id, {
                "status": JobStatus.PROCESSING.value, "started_at": func.coalesce(JOBS.c.started_at, now),
                "lease_owner": owner, "lease_expires_at": now + self.limits.lease, "attempts": JOBS.c.attempts + 1,
            })
        return self.publish(row, "job claimed", rescued=candidate.status == JobStatus.PROCESSING.value)

    def renew_lease(self, job: Job) -> bool:
        """Heartbeat of a planner or assembler; False: the job is no longer ours.

        Not an event: nothing a watcher sees has changed, so neither the version nor the bus hears of it.
        """
        with write_transaction(self.engine) as conn:
            result = conn.execute(update(JOBS).where(
                JOBS.c.id == job.id, JOBS.c.status == JobStatus.PROCESSING.value,
                JOBS.c.lease_owner == job.lease_owner).values(lease_expires_at=now_utc() + self.limits.lease))
        return result.rowcount == 1

    def lapse(self, job: Job) -> bool:
        """Give up the lease of a job being assembled, so that the next claim (any replica) takes the
        assembly over at once; False: the job is no longer ours. Not an event."""
        with write_transaction(self.engine) as conn:
            result = conn.execute(update(JOBS).where(
                JOBS.c.id == job.id, JOBS.c.status == JobStatus.PROCESSING.value,
                JOBS.c.lease_owner == job.lease_owner).values(lease_expires_at=now_utc()))
        return result.rowcount == 1

    def complete(self, job: Job, *, storage_key: str, written: int, size_bytes: int = 0, sha256: str | None = None,
                 details: str | None = None) -> Job | None:
        return self._worker_change(job, {
            "status": JobStatus.COMPLETED.value, "storage_key": storage_key, "size_bytes": size_bytes,
            "users_written": written, "sha256": sha256, "status_details": details,
            "users_total": written, "percentage_done": 100, "time_left_seconds": 0, "finished_at": now_utc(),
            "lease_owner": None, "lease_expires_at": None,
        }, "job completed")

    def fail(self, job: Job, error: str) -> Job | None:
        return self._worker_change(job, {
            "status": JobStatus.FAILED.value, "error": error, "finished_at": now_utc(), "time_left_seconds": None,
            "lease_owner": None, "lease_expires_at": None,
        }, "job failed")

    def release(self, job: Job) -> Job | None:
        """Hand back a job being planned (graceful shutdown, a retry) so another worker starts it afresh."""
        return self._worker_change(job, {
            "status": JobStatus.PENDING.value, "started_at": None, "users_written": 0, "users_total": 0,
            "percentage_done": 0, "time_left_seconds": None, "lease_owner": None, "lease_expires_at": None,
        }, "job released")

    # --- reaper --------------------------------------------------------------------------------

    def expire_due(self) -> builtins.list[Job]:
        """Expire jobs past their lifetime; returns them. They keep their storage key until the file
        is deleted (jobs/files.py), so a failed delete is retried rather than forgotten."""
        now = now_utc()
        with write_transaction(self.engine) as conn:
            due = conn.execute(select(JOBS.c.id).where(
                JOBS.c.expires_at <= now, JOBS.c.status != JobStatus.EXPIRED.value)
                .with_for_update(skip_locked=True)).scalars().all()
            rows = [change_row(conn, job_id, {"status": JobStatus.EXPIRED.value, "lease_owner": None,
                                                "lease_expires_at": None, "time_left_seconds": None})
                    for job_id in due]
        return [self.publish(row, "job expired") for row in rows]

    def expired_with_files(self, limit: int = 1000) -> builtins.list[Job]:
        """Expired (or revoked) jobs whose file is not deleted yet: just expired, or a delete failed."""
        with reading(self.engine) as conn:
            rows = conn.execute(select(JOBS).where(JOBS.c.status == JobStatus.EXPIRED.value,
                                                   JOBS.c.storage_key.is_not(None)).limit(limit)).all()
        return [Job.from_row(row) for row in rows]

    def fail_timed_out(self) -> builtins.list[Job]:
        """Fail jobs processing longer than the timeout; their workers see it at the next progress step."""
        now = now_utc()
        limit = self.limits.job_timeout
        with write_transaction(self.engine) as conn:
            due = conn.execute(select(JOBS.c.id).where(
                JOBS.c.status == JobStatus.PROCESSING.value, JOBS.c.started_at <= now - limit)
                .with_for_update(skip_locked=True)).scalars().all()
            rows = [change_row(conn, job_id, {
                "status": JobStatus.FAILED.value, "finished_at": now, "lease_owner": None, "lease_expires_at": None,
                "time_left_seconds": None,
                "error": f"Timed out: the export ran longer than {limit.total_seconds():g} seconds.",
            }) for job_id in due]
        return [self.publish(row, "job timed out") for row in rows]

    def purge_expired(self) -> int:
        """Delete expired jobs once their retention period is over, and their file is gone (a job
        whose file could not be deleted yet stays, so its key is not lost)."""
        cutoff = now_utc() - self.limits.expired_retention
        with write_transaction(self.engine) as conn:
            result = conn.execute(delete(JOBS).where(JOBS.c.status == JobStatus.EXPIRED.value,
                                                     JOBS.c.expires_at <= cutoff, JOBS.c.storage_key.is_(None)))
        if result.rowcount:
            log.info("jobs purged", count=result.rowcount)
        return result.rowcount

    # --- helpers -------------------------------------------------------------------------------

    def _worker_change(self, job: Job, values: dict[str, Any], event: str) -> Job | None:
        """A change by whoever holds `job`: its lease owner, or (None) the slices phase's workers."""
        with write_transaction(self.engine) as conn:
            row = change_row(conn, job.id, values, and_(JOBS.c.status == JobStatus.PROCESSING.value,
                                                          JOBS.c.lease_owner == job.lease_owner))
        return None if row is None else self.publish(row, event)

    def publish(self, row: Any, event: str, **extra: Any) -> Job:
        """The committed change `row` as a Job, logged and published to watchers."""
        return self._published_job(Job.from_row(row), event, **extra)

    def _published_job(self, job: Job, event: str, **extra: Any) -> Job:
        level = logging.DEBUG if event == "job progress" else logging.INFO
        if log.isEnabledFor(level):
            log.log(level, event, job_id=job.id, tenant=job.tenant, status=job.status.value, version=job.version,
                    written=f"{job.users_written}/{job.users_total}", error=job.error, **extra)
        self.bus.deliver(job)
        return job


def change_row(conn: Connection, job_id: str, values: dict[str, Any], condition: Any = None) -> Any:
    """Update a job, bumping its version (every change is an event); the new row, or None when
    `condition` did not hold."""
    statement = update(JOBS).where(JOBS.c.id == job_id)
    if condition is not None:
        statement = statement.where(condition)
    values = {**values, "version": JOBS.c.version + 1, "updated_at": now_utc()}
    return conn.execute(statement.values(**values).returning(*JOBS.c)).first()
