"""The phases of an export, run by the worker threads: plan a job into slices, export a slice into
its part, assemble the parts into the job's file. Each phase calls the stores for every query and
the storage for every file, runs as a Run (jobs/runs.py) whose lease follows its progress, and
hands failures to the FailurePolicy.

Any error raised after a run was told to stop (a cancel, shutdown, a lost lease, a stall) is that
stop, not a failure: cancelling a run in place breaks its query on purpose.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable

from userexport_server.db.engine import canceller, export_reads
from userexport_server.db.standby import ExportReads
from userexport_server.errors import WorkStopped
from userexport_server.export.changes import require_log_intact
from userexport_server.export.engine import DEFAULT_BATCH_ROWS, run_export
from userexport_server.jobs.assembly import Assembler, NotWhole
from userexport_server.jobs.failures import FailurePolicy, Unwritten
from userexport_server.jobs.model import Job
from userexport_server.jobs.planning import PlanningStore
from userexport_server.jobs.runs import Run, Runs
from userexport_server.jobs.slices import Slice, SliceStore
from userexport_server.jobs.store import JobStore
from userexport_server.logs import EventLog, RateLimitedLog
from userexport_server.metrics import Metrics
from userexport_server.storage.base import ObjectWriter, Storage, object_key
from userexport_server.tracing import Tracing

log = EventLog(__name__)
_limited_log = RateLimitedLog(log, limit=1)
# A slice writes progress at most this often (and at least once a second while rows flow): each
# write is a transaction and a message to every watcher, and on 2 cores every message to 1,000
# watchers costs the export about 0.1 s (bench/load_bench.py: 1.9x its time with one watcher at
# every 1%, 1.5x at four a second, 1.35x at two).
PROGRESS_MIN_SECONDS = 0.5
# After a failed progress write the export goes on, and writes progress again after this.
PROGRESS_RETRY_SECONDS = 2.0
# Reasons after which stopped work is handed back at once, for any worker to take again.
HAND_BACK = frozenset({"shutdown", "stalled"})


def batch_rows(total: int) -> int:
    """Rows between progress calls: at most half a percent of the export, so watchers get every 1%."""
    return max(100, min(DEFAULT_BATCH_ROWS, total // 200))


class _SliceProgress:
    """The engine's progress callback for one slice: the run moved; progress is written once per 1%
    of the job but at most every PROGRESS_MIN_SECONDS, or after a second without; False (stop) when
    the run was told to stop or the slice is no longer this worker's."""

    def __init__(self, slices: SliceStore, piece: Slice, job_total: int, run: Run) -> None:
        self.slices, self.piece, self.run = slices, piece, run
        self.step = max(1, job_total // 100)
        self.last_write, self.last_written = time.monotonic(), 0

    def __call__(self, written: int) -> bool:
        self.run.moved()
        if self.run.stop.is_set():
            return False
        now = time.monotonic()
        since = now - self.last_write
        if (written - self.last_written >= self.step and since >= PROGRESS_MIN_SECONDS) or since >= 1.0:
            try:
                job = self.slices.progress(self.piece, written)
            except Exception as error:
                # Progress is for watchers; what counts is the final write, and the lease, which
                # follows the rows read, not these writes: a stalled database slows progress only.
                _limited_log.log(logging.WARNING, "progress", "progress write failed, export goes on",
                                 job_id=self.piece.job_id, slice=self.piece.seq, error=error)
                self.last_write = now + PROGRESS_RETRY_SECONDS
                return True
            if job is None:
                self.run.signal("slice no longer held")
                return False
            self.last_write, self.last_written = now, written
        return True


class _Moving:
    """A storage writer that counts what passes through (the file's size, for the retained-bytes
    quota) and tells the run it moved."""

    def __init__(self, writer: ObjectWriter, run: Run) -> None:
        self.writer, self.run, self.size = writer, run, 0

    def write(self, data: bytes) -> None:
        self.writer.write(data)
        self.size += len(data)
        self.run.moved()


class Phases:
    """What the workers do with what they claim. `wake` tells idle workers here that slices wait."""

    def __init__(self, *, store: JobStore, slices: SliceStore, reads: ExportReads, storage: Storage, runs: Runs,
                 policy: FailurePolicy, tracing: Tracing, metrics: Metrics, gzip_level: int, slice_users: int,
                 wake: Callable[[], None]) -> None:
        self.store, self.slices, self.planning = store, slices, PlanningStore(reads)
        self.assembler = Assembler(storage, self.planning)
        self.reads, self.storage, self.runs, self.policy = reads, storage, runs, policy
        self.tracing, self.metrics, self.wake = tracing, metrics, wake
        self.gzip_level, self.slice_users = gzip_level, max(1, slice_users)

    # --- a job: planning or assembling ---------------------------------------------------------

    def run_job(self, job: Job) -> None:
        planned = self.slices.is_planned(job.id)
        work = "assemble" if planned else "plan"
        with self.runs.running(job.id, work, lambda: self.store.renew_lease(job)) as run:
            self.tracing.mark("claimed", _ref(job), {"userexport.attempt": job.attempts, "userexport.work": work})
            try:
                if planned:  # its assembler died: take the assembly over
                    self._assemble(job, run)
                else:
                    self._plan(job, run)
            except Exception as error:
                if not run.stop.is_set():
                    self.policy.failed(job, error, job.attempts, retry=lambda: self._hand_back_job(job, planned))
                    return
                if HAND_BACK.intersection(run.reasons):
                    self.policy.final_write(job, "release", lambda: self._hand_back_job(job, planned))
                log.info("job stopped", job_id=job.id, tenant=job.tenant, work=work, reason=",".join(run.reasons))

    def _plan(self, job: Job, run: Run) -> None:
        """Count the users and cut them into slices, which every worker then takes."""
        with self.tracing.span("planned", _ref(job)) as span:
            plan = self.planning.plan(job.tenant, job.spec, self.slice_users, run)
            ranges = plan.ranges
            span.set_attributes({"userexport.users": sum(r.rows for r in ranges), "userexport.slices": len(ranges)})
        if run.stop.is_set() or self.slices.plan(job, ranges, plan.watermark) is None:
            raise WorkStopped("the plan is no longer this worker's")
        self.wake()  # the other idle workers of this replica take slices at once

    def _hand_back_job(self, job: Job, planned: bool) -> Job | bool | None:
        """A plan starts over; an assembly is left to the next claim, here or elsewhere."""
        return self.store.lapse(job) if planned else self.store.release(job)

    def _assemble(self, job: Job, run: Run) -> None:
        """Join the parts (in key order) into the job's file and prove it whole (jobs/assembly.py),
        complete the job, delete the parts and whatever else is left in the job's folder (a killed
        attempt's partial file). Parts that do not add up fail the job."""
        started = time.monotonic()
        key = object_key(job.tenant, job.id, job.filename)
        parts = self.slices.parts(job.id)
        # The file is whole in storage once this span ends (one slice wrote it itself, else it joins the parts).
        with self.tracing.span("upload", _ref(job), {"userexport.parts": len(parts)}):
            try:
                file = self.assembler.assemble(job, parts, key, run)
            except NotWhole as error:
                if run.stop.is_set():
                    raise WorkStopped("the assembly is no longer this worker's") from None
                log.error("export not whole", job_id=job.id, tenant=job.tenant, error=str(error))
                self.policy.fail(job, f"The export failed: {error}.")
                return
        if run.stop.is_set():
            raise WorkStopped("the assembly is no longer this worker's")
        written, size = file.users, file.size_bytes
        done = self.policy.final_write(job, "complete", lambda: self.store.complete(
            job, storage_key=key, written=written, size_bytes=size, sha256=file.sha256, details=file.details))
        if isinstance(done, Unwritten):
            return  # the file stays: the rescuing assembler replaces it, or the sweep deletes it
        if done is None:
            self._discard(job, key)
        else:
            self.tracing.ended("completed", _ref(job), {"userexport.users": written, "userexport.bytes": size})
            log.info("export done", job_id=job.id, tenant=job.tenant, users=written, parts=len(parts), bytes=size,
                     sha256=file.sha256, assemble_seconds=round(time.monotonic() - started, 2))
            if done.started_at is not None and done.finished_at is not None:
                self.metrics.export_done((done.finished_at - done.started_at).total_seconds())
        self._clear_leftovers(job, keep=key)

    def _clear_leftovers(self, job: Job, keep: str) -> None:
        """Parts, and a killed attempt's partial file, are not needed once the job's file (`keep`, unless
        _discard deleted it) exists or the job ended. A failure is logged and left to the reaper, which
        deletes the parts of ended jobs and then their slices, and to the orphan sweep."""
        try:
            self.storage.delete_leftovers(job.tenant, job.id, keep)
            self.slices.forget(job.id)
        except Exception as error:
            log.warning("deleting export parts failed; the reaper retries", job_id=job.id, tenant=job.tenant,
                        error=error)

    # --- a slice -------------------------------------------------------------------------------

    def run_slice(self, piece: Slice, job: Job) -> None:
        with self.runs.running(job.id, f"slice {piece.seq}", lambda: self.slices.renew(piece)) as run, \
                self.metrics.slices_in_flight.track_inprogress():
            started = time.monotonic()
            whole = piece.key_range.after is None and piece.key_range.through is None
            key = object_key(job.tenant, job.id, job.filename if whole else piece.part_name(job.spec.file_suffix))
            try:
                with self.tracing.span("slice", _ref(job), {"userexport.slice": piece.seq,
                                                            "userexport.attempt": piece.attempts}) as span:
                    written, size = self._export(job, piece, key, run)
                    span.set_attributes({"userexport.users": written, "userexport.bytes": size})
            except Exception as error:
                if not run.stop.is_set():
                    self.policy.failed(job, error, piece.attempts, retry=lambda: self.slices.hand_back(piece))
                    return
                if HAND_BACK.intersection(run.reasons):
                    self.policy.final_write(job, "slice hand back", lambda: self.slices.hand_back(piece))
                log.info("slice stopped", job_id=job.id, tenant=job.tenant, slice=piece.seq,
                         reason=",".join(run.reasons))
                # A stop that lands after the part's commit, as the slice's connection closes (its
                # cancel cut it), raises here all the same: the committed part is then for nothing.
                self._discard(job, key)
                return
            outcome = self.policy.final_write(job, "slice done", lambda: self.slices.finish(
                piece, part_key=key, written=written, size_bytes=size))
            if isinstance(outcome, Unwritten):
                return  # the slice's lease lapses and another worker exports it again
            recorded, assemble = outcome
            seconds = time.monotonic() - started
            log.info("slice done", job_id=job.id, tenant=job.tenant, slice=piece.seq, users=written,
                     seconds=round(seconds, 2), recorded=recorded)
            if not recorded:
                self._discard(job, key)
                return
            self.metrics.slice_done(written, size, seconds)
        if assemble is not None:
            with self.runs.running(job.id, "assemble", lambda: self.store.renew_lease(assemble)) as run:
                try:
                    self._assemble(assemble, run)
                except Exception as error:
                    if not run.stop.is_set():
                        self.policy.failed(assemble, error, assemble.attempts,
                                           retry=lambda: self._hand_back_job(assemble, planned=True))

    def _export(self, job: Job, piece: Slice, key: str, run: Run) -> tuple[int, int]:
        """Export the slice into its part; returns the users written and the part's size in bytes."""
        if piece.attempts > 1 and key.endswith(job.filename):
            # An earlier attempt may have committed the file before its replica died; objects are
            # never overwritten, so clear the way (that file was whole, and so will this one be).
            self.storage.delete(key)
        with (self.reads.connect(run, piece.seq) as conn, run.cancellable(canceller(conn)),
              contextlib.ExitStack() as query):
            export_reads(conn)
            writer = self.storage.open_writer(key, key.rsplit("/", 1)[-1])
            moving = _Moving(writer, run)
            try:
                written = run_export(conn, job.tenant, job.spec, moving, gzip_level=self.gzip_level,
                                     progress=_SliceProgress(self.slices, piece, job.users_total, run),
                                     batch_rows=batch_rows(job.users_total), key_range=piece.key_range,
                                     on_query=lambda reader: query.enter_context(run.cancellable(reader.cancel)))
                require_log_intact(conn, job.spec)
                if run.stop.is_set():
                    raise WorkStopped("the slice is no longer this worker's")
                writer.commit()
            except BaseException:
                writer.abort()
                raise
        return written, moving.size

    def _discard(self, job: Job, key: str) -> None:
        """A file or part written for nothing (its job ended, or the slice was fenced): delete it,
        unless the job holds it after all (a complete that committed though its reply was lost) or
        another attempt runs it now (that attempt clears the key itself before it starts)."""
        try:
            current = self.store.get_any(job.id)
            if current is not None and (current.storage_key == key or
                                        (not current.status.is_terminal and key.endswith(job.filename))):
                return
            self.storage.delete(key)
            log.info("export output discarded", job_id=job.id, tenant=job.tenant, key=key)
        except Exception as error:  # the orphan sweep deletes it later
            log.error("discarding export output failed", job_id=job.id, tenant=job.tenant, key=key, error=error)


def _ref(job: Job) -> tuple[str, str | None]:
    return job.id, job.trace_parent
