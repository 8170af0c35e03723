"""Slices: a job's users cut into key ranges, each exported as its own part (a gzip member, or a
Parquet file) by whichever worker, on whichever replica, claims it next.

A job goes through three phases, told apart by its lease:
- planning (lease held by the planner): count the users, cut them into ranges, insert the slices;
- slices (no job lease): every slice is claimed, leased and renewed on its own, like a job, so a
  replica's death loses only the slices it was running and the job resumes from the rest;
- assembling (lease held by the worker that finished the last slice): the parts are concatenated
  (local) or composed (GCS) into the final file (jobs/assembly.py), and the job completes.

A planner or assembler that dies leaves a job lease that lapses, and the next claim (JobStore.claim)
takes the job over. The job's progress is the sum over its slices, never lower than it was.
Claims take the slice of the tenant served least recently, so a small export of one tenant is not
stuck behind another tenant's big ones.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Connection, Table, and_, delete, exists, func, insert, or_, select, update

from userexport_server.db.engine import reading, write_transaction
from userexport_server.db.models import JobSlice as SliceRow
from userexport_server.export.sql import KeyRange
from userexport_server.jobs.model import TERMINAL, Job, JobStatus, now_utc, utc
from userexport_server.jobs.store import JOBS, JobStore, change_row
from userexport_server.logs import EventLog

log = EventLog(__name__)
slices = cast(Table, SliceRow.__table__)

PENDING, RUNNING, DONE = "pending", "running", "done"


@dataclass(frozen=True, slots=True)
class Slice:
    job_id: str
    seq: int
    tenant: str
    key_range: KeyRange
    attempts: int
    lease_owner: str | None

    @classmethod
    def from_row(cls, row: Any) -> Slice:
        return cls(row.job_id, row.seq, row.tenant, KeyRange(row.after, row.through, row.rows), row.attempts,
                   row.lease_owner)

    def part_name(self, suffix: str) -> str:
        """The slice's part file in the job's folder, ending like the job's file (`suffix`): one per
        attempt, so a stale worker's upload never collides with its successor's."""
        return f"part-{self.seq:05d}-{self.attempts}{suffix}"


@dataclass(frozen=True, slots=True)
class Part:
    """A finished slice's file, in key order: what it holds, and the key range (with the users
    counted in it) that it was planned for."""

    seq: int
    key: str
    users: int
    size_bytes: int
    planned: KeyRange


class SliceStore:
    """Every slice query; job rows change through JobStore's helpers, so versions and events stay
    one rule."""

    def __init__(self, store: JobStore) -> None:
        self.store, self.engine, self.lease = store, store.engine, store.limits.lease

    # --- planning ------------------------------------------------------------------------------

    def plan(self, job: Job, ranges: list[KeyRange], watermark: str | None = None) -> Job | None:
        """Insert the job's slices and hand it from its planner to the slice workers, with the
        watermark taken before its reads, in one transaction; None: the job is no longer the planner's."""
        with write_transaction(self.engine, lock_key=_lock(job.id)) as conn:
            row = change_row(conn, job.id, {
                "lease_owner": None, "lease_expires_at": None, "users_written": 0, "percentage_done": 0,
                "users_total": sum(r.rows for r in ranges), "time_left_seconds": None, "watermark": watermark,
            }, _held(job))
            if row is None:
                return None
            conn.execute(delete(slices).where(slices.c.job_id == job.id))  # of an earlier, abandoned plan
            conn.execute(insert(slices), [
                {"job_id": job.id, "seq": seq, "tenant": job.tenant, "after": r.after, "through": r.through,
                 "rows": r.rows, "status": PENDING, "attempts": 0, "users_written": 0, "size_bytes": 0}
                for seq, r in enumerate(ranges)])
        log.info("job planned", job_id=job.id, tenant=job.tenant, slices=len(ranges), users=row.users_total)
        return self.store.publish(row, "job planned")

    def is_planned(self, job_id: str) -> bool:
        with reading(self.engine) as conn:
            return conn.execute(select(exists().where(slices.c.job_id == job_id))).scalar_one()

    # --- slices phase --------------------------------------------------------------------------

    def claim(self, owner: str) -> tuple[Slice, Job] | None:
        """Take a pending slice, or one whose worker stopped renewing its lease, of a job in its
        slices phase: from the tenant whose latest slice claim is oldest, then the oldest job."""
        now = now_utc()
        others = slices.alias("served")
        last_served = (select(func.max(others.c.claimed_at)).where(others.c.tenant == slices.c.tenant)
                       .scalar_subquery())
        with write_transaction(self.engine) as conn:
            candidate = conn.execute(
                select(slices.c.job_id, slices.c.seq).join(JOBS, JOBS.c.id == slices.c.job_id)
                .where(JOBS.c.status == JobStatus.PROCESSING.value, JOBS.c.lease_owner.is_(None),
                       or_(slices.c.status == PENDING,
                           and_(slices.c.status == RUNNING, slices.c.lease_expires_at < now)))
                .order_by(last_served.asc().nulls_first(), JOBS.c.created_at, slices.c.seq)
                .limit(1).with_for_update(skip_locked=True, of=slices)
            ).first()
            if candidate is None:
                return None
            row = conn.execute(update(slices).where(slices.c.job_id == candidate.job_id,
                                                    slices.c.seq == candidate.seq).values(
                status=RUNNING, lease_owner=owner, lease_expires_at=now + self.lease, claimed_at=now,
                attempts=slices.c.attempts + 1, users_written=0, part_key=None, size_bytes=0,
            ).returning(*slices.c)).one()
            job_row = conn.execute(select(JOBS).where(JOBS.c.id == candidate.job_id)).one()
        piece, job = Slice.from_row(row), Job.from_row(job_row)
        log.info("slice claimed", job_id=piece.job_id, tenant=piece.tenant, slice=piece.seq, attempt=piece.attempts,
                 rescued=piece.attempts > 1)
        return piece, job

    def renew(self, piece: Slice) -> bool:
        """Heartbeat: False when the slice is no longer ours or its job no longer runs (cancelled,
        failed, expired), which tells the export to stop."""
        with write_transaction(self.engine) as conn:
            result = conn.execute(update(slices).where(
                _slice_held(piece), _job_running(piece.job_id)).values(lease_expires_at=now_utc() + self.lease))
        return result.rowcount == 1

    def progress(self, piece: Slice, written: int) -> Job | None:
        """Record the slice's progress and the job's (the sum over slices, never lower than before);
        None: the slice or the job is no longer this worker's to run."""
        with write_transaction(self.engine, lock_key=_lock(piece.job_id)) as conn:
            result = conn.execute(update(slices).where(_slice_held(piece), _job_running(piece.job_id)).values(
                users_written=written, lease_expires_at=now_utc() + self.lease))
            if result.rowcount != 1:
                return None
            row = self._job_progress(conn, piece.job_id)
        return None if row is None else self.store.publish(row, "job progress")

    def finish(self, piece: Slice, *, part_key: str, written: int, size_bytes: int) -> tuple[bool, Job | None]:
        """Mark the slice done with its part file. Returns (recorded, job): recorded is False when
        the slice or its job was no longer ours (the part is the caller's to delete); job is set when
        this was the job's last slice, and then the caller holds the job's lease and assembles it."""
        now = now_utc()
        with write_transaction(self.engine, lock_key=_lock(piece.job_id)) as conn:
            result = conn.execute(update(slices).where(_slice_held(piece), _job_running(piece.job_id)).values(
                status=DONE, part_key=part_key, users_written=written, size_bytes=size_bytes, lease_owner=None,
                lease_expires_at=None))
            if result.rowcount != 1:
                return False, None
            unfinished = conn.execute(select(func.count()).select_from(slices).where(
                slices.c.job_id == piece.job_id, slices.c.status != DONE)).scalar_one()
            if unfinished:
                row = self._job_progress(conn, piece.job_id)
                event = "job progress"
            else:
                row = change_row(conn, piece.job_id, {"lease_owner": piece.lease_owner,
                                                      "lease_expires_at": now + self.lease, "time_left_seconds": 0,
                                                      "users_written": JOBS.c.users_total, "percentage_done": 100},
                                 and_(JOBS.c.status == JobStatus.PROCESSING.value, JOBS.c.lease_owner.is_(None)))
                event = "job assembling"
        job = None if row is None else self.store.publish(row, event)
        return True, None if unfinished else job

    def hand_back(self, piece: Slice) -> bool:
        """Return a running slice to the pool (shutdown, a retry), for any worker to start again."""
        with write_transaction(self.engine) as conn:
            result = conn.execute(update(slices).where(_slice_held(piece)).values(
                status=PENDING, lease_owner=None, lease_expires_at=None))
        return result.rowcount == 1

    # --- assembling ----------------------------------------------------------------------------

    def parts(self, job_id: str) -> list[Part]:
        """The job's finished parts in key order; all of them, once the job is being assembled."""
        with reading(self.engine) as conn:
            rows = conn.execute(select(slices.c.seq, slices.c.part_key, slices.c.users_written, slices.c.size_bytes,
                                       slices.c.after, slices.c.through, slices.c.rows)
                                .where(slices.c.job_id == job_id, slices.c.status == DONE)
                                .order_by(slices.c.seq)).all()
        return [Part(row.seq, row.part_key, row.users_written, row.size_bytes,
                     KeyRange(row.after, row.through, row.rows)) for row in rows]

    def forget(self, job_id: str) -> None:
        """Drop the slices of a finished job (their parts are deleted, or left to the sweep)."""
        with write_transaction(self.engine) as conn:
            conn.execute(delete(slices).where(slices.c.job_id == job_id))

    def of_finished_jobs(self, limit: int = 100) -> dict[str, list[str]]:
        """For the reaper: jobs that ended (cancelled, failed, expired, or completed while their
        assembler died before cleaning up) or are gone, and still have slices, with the keys of
        their parts (never the job's own file, which a one-slice job wrote as its part)."""
        with reading(self.engine) as conn:
            ended = select(JOBS.c.id).where(JOBS.c.status.in_([s.value for s in TERMINAL])) \
                .where(exists().where(slices.c.job_id == JOBS.c.id)).limit(limit).scalar_subquery()
            rows = conn.execute(select(slices.c.job_id, slices.c.part_key, JOBS.c.storage_key)
                                .join(JOBS, JOBS.c.id == slices.c.job_id).where(slices.c.job_id.in_(ended))).all()
            gone = conn.execute(select(slices.c.job_id).where(~exists().where(JOBS.c.id == slices.c.job_id))
                                .limit(limit)).scalars().all()
        found: dict[str, list[str]] = {job_id: [] for job_id in gone}
        for row in rows:
            keys = found.setdefault(row.job_id, [])
            if row.part_key and row.part_key != row.storage_key:
                keys.append(row.part_key)
        return found

    # --- helpers -------------------------------------------------------------------------------

    def _job_progress(self, conn: Connection, job_id: str) -> Any:
        """Set the job's progress from its slices; the caller holds the job's lock."""
        job = conn.execute(select(JOBS.c.users_written, JOBS.c.users_total, JOBS.c.started_at,
                                  JOBS.c.time_left_seconds).where(JOBS.c.id == job_id)).one()
        summed = conn.execute(select(func.coalesce(func.sum(slices.c.users_written), 0))
                              .where(slices.c.job_id == job_id)).scalar_one()
        written, total = max(job.users_written, int(summed)), job.users_total
        left = _time_left(job.started_at, written, total)
        if left is not None and job.time_left_seconds is not None:
            left = min(left, job.time_left_seconds)
        return change_row(conn, job_id, {
            "users_written": written, "percentage_done": 100 if total == 0 else min(100, written * 100 // total),
            "time_left_seconds": left,
        }, and_(JOBS.c.status == JobStatus.PROCESSING.value, JOBS.c.lease_owner.is_(None)))


def _time_left(started_at: dt.datetime | None, written: int, total: int) -> int | None:
    if not written or started_at is None:
        return None
    elapsed = (now_utc() - utc(started_at)).total_seconds()
    return max(0, round(elapsed / written * (total - written)))


def _lock(job_id: str) -> str:
    """Serialises a job's slice transactions on PostgreSQL, so exactly one finisher sees no slice left."""
    return f"job:{job_id}"


def _held(job: Job) -> Any:
    return and_(JOBS.c.status == JobStatus.PROCESSING.value, JOBS.c.lease_owner == job.lease_owner)


def _slice_held(piece: Slice) -> Any:
    return and_(slices.c.job_id == piece.job_id, slices.c.seq == piece.seq, slices.c.status == RUNNING,
                slices.c.lease_owner == piece.lease_owner)


def _job_running(job_id: str) -> Any:
    return exists().where(JOBS.c.id == job_id, JOBS.c.status == JobStatus.PROCESSING.value)
