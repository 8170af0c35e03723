"""The worker pool: threads that plan jobs into slices, export slices into storage, assemble the parts,
and report progress."""
from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TypeVar

from sqlalchemy import Engine

from userexport_server.db.engine import export_reads
from userexport_server.db.faults import is_transient_db_error
from userexport_server.errors import StorageError
from userexport_server.export.engine import DEFAULT_BATCH_ROWS, ExportCancelled, run_export
from userexport_server.export.sql import count_users, key_ranges
from userexport_server.jobs.model import Job
from userexport_server.jobs.retry import Backoff, retry_transient
from userexport_server.jobs.slices import Slice, SliceStore
from userexport_server.jobs.store import JobStore
from userexport_server.metrics import Metrics
from userexport_server.storage.base import ObjectWriter, Storage, object_key
from userexport_server.tracing import Tracing

log = logging.getLogger(__name__)

FAILED_INTERNALLY = "The export failed because of an internal error; it is logged under this job's id."
DATABASE_UNAVAILABLE = "the database was unavailable (unreachable, or locked for too long)"

# A job's final write (complete, fail, release) is tried this often before the job is left to lease
# rescue; with SQLite's busy timeout on each try, that rides out a lock of about 6 x busy + 12 s.
FINAL_WRITE_ATTEMPTS = 6
FINAL_WRITE_BACKOFF = Backoff(initial=0.2, maximum=5.0)
# Between two attempts of a job that hit a transient error, and between failed claims.
JOB_RETRY_BACKOFF = Backoff(initial=1.0, maximum=30.0)
CLAIM_BACKOFF = Backoff(initial=0.5, maximum=30.0)
# After a failed progress write the export goes on, and writes progress again after this.
PROGRESS_BACKOFF = Backoff(initial=1.0, maximum=10.0)
# A slice writes progress at most this often (and at least once a second while rows flow): each
# write is a transaction and a message to every watcher, and on 2 cores every message to 1,000
# watchers costs the export about 0.1 s (bench/load_bench.py: 1.9x its time with one watcher at
# every 1%, 1.5x at four a second, 1.35x at two).
PROGRESS_MIN_SECONDS = 0.5


def batch_rows(total: int) -> int:
    """Rows between progress calls: at most half a percent of the export, so watchers get every 1%."""
    return max(100, min(DEFAULT_BATCH_ROWS, total // 200))


class _SliceProgress:
    """The engine's progress callback for one slice: writes progress once per 1% of the job but at
    most every PROGRESS_MIN_SECONDS, or after a second without, and says stop when the slice was
    cancelled here, or is no longer this worker's (its job cancelled, expired or timed out elsewhere,
    its lease lost), or the server is shutting down."""

    def __init__(self, slices: SliceStore, piece: Slice, job_total: int, stop: threading.Event) -> None:
        self.slices, self.piece, self.stop = slices, piece, stop
        self.step = max(1, job_total // 100)
        self.last_write, self.last_written = time.monotonic(), 0
        self.failures, self.retry_at = 0, 0.0

    def __call__(self, written: int) -> bool:
        if self.stop.is_set():
            return False
        now = time.monotonic()
        since = now - self.last_write
        if ((written - self.last_written >= self.step and since >= PROGRESS_MIN_SECONDS) or since >= 1.0) \
                and now >= self.retry_at:
            try:
                job = self.slices.progress(self.piece, written)
            except Exception as error:
                if not is_transient_db_error(error):
                    raise
                # Progress is for watchers; the lease (heartbeat) and the final write are what
                # count, so a stalled database slows the export down instead of stopping it.
                self.failures += 1
                self.retry_at = time.monotonic() + PROGRESS_BACKOFF.delay(self.failures)
                log.warning("progress write failed, export goes on job_id=%s slice=%d failures=%d error=%s",
                            self.piece.job_id, self.piece.seq, self.failures, type(error).__name__)
                return True
            if job is None:
                return False
            self.last_write, self.last_written, self.failures = now, written, 0
        return True


class _Counted:
    """A storage writer that counts what passes through: the file's size, for the retained-bytes quota."""

    def __init__(self, writer: ObjectWriter) -> None:
        self.writer, self.size = writer, 0

    def write(self, data: bytes) -> None:
        self.writer.write(data)
        self.size += len(data)


class _Run:
    """One piece of work running here (a planning, a slice, an assembly), so that cancel and
    shutdown can reach it."""

    def __init__(self, job_id: str) -> None:
        self.job_id, self.stop, self.reasons = job_id, threading.Event(), list[str]()

    def signal(self, reason: str) -> None:
        self.reasons.append(reason)
        self.stop.set()


class WorkerPool:
    """Export threads that never die of an error: each is caught, logged with the job's id, and
    the thread goes on (see healthy()). Each thread claims, in turn, a job to plan or assemble
    (JobStore.claim) or else a slice of a running job (SliceStore.claim), so the workers of every
    replica share each job's slices. Work that hit a transient database or storage error runs
    again, up to `attempts` claims, and then its job fails naming the cause."""

    def __init__(self, store: JobStore, engine: Engine, storage: Storage, *, workers: int,
                 poll_interval: float, gzip_level: int, lease_seconds: float, metrics: Metrics, attempts: int = 3,
                 slice_users: int = 100_000, tracing: Tracing) -> None:
        self.store, self.slices, self.engine, self.storage = store, SliceStore(store), engine, storage
        self.tracing, self.metrics = tracing, metrics
        self.attempts, self.slice_users = attempts, max(1, slice_users)
        self.heartbeat_interval = lease_seconds / 3
        self.poll_interval, self.gzip_level = poll_interval, gzip_level
        self.owner = f"{uuid.uuid4().hex[:12]}"
        self._threads = [threading.Thread(target=self._loop, name=f"export-worker-{i}", daemon=True)
                         for i in range(workers)]
        self._wakeups = 0
        self._condition = threading.Condition()
        self._stopping = threading.Event()
        self._running: set[_Run] = set()
        self._lock = threading.Lock()
        self._started = False
        # SQLite formats inside this process, where two slices at once ran 1.2-1.75x slower than
        # one after the other (its allocator's mutex and the GIL are shared), so one slice runs at
        # a time there; a PostgreSQL slice's formatting runs in its own backend.
        self._slice_slots = threading.BoundedSemaphore(1 if engine.dialect.name == "sqlite" else max(1, workers))

    def start(self) -> None:
        for thread in self._threads:
            thread.start()
        self._started = True
        log.info("workers started owner=%s count=%d slice_users=%d", self.owner, len(self._threads),
                 self.slice_users)

    def wake(self) -> None:
        """A job was created (or planned) here: idle workers claim it now rather than at their next poll."""
        with self._condition:
            self._wakeups += 1
            self._condition.notify_all()

    def cancel_local(self, job_id: str) -> None:
        """Stop a job's work on this replica at once (other replicas notice at their next heartbeat)."""
        self._signal("cancelled", job_id)

    def healthy(self) -> str | None:
        """None while every worker thread is alive, else why not (cheap: for a health check each second)."""
        if not self._started or self._stopping.is_set():
            return "export workers are not running (not started yet, or stopping)"
        dead = sum(not thread.is_alive() for thread in self._threads)
        return f"{dead} of {len(self._threads)} export workers are dead" if dead else None

    def running(self) -> list[str]:
        """The jobs with work running on this replica."""
        with self._lock:
            return sorted({run.job_id for run in self._running})

    def shutdown(self, grace: float) -> None:
        """Stop claiming; let running work finish for `grace` seconds, then hand the rest back."""
        self._stopping.set()
        self.wake()
        deadline = time.monotonic() + grace
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._signal("shutdown")
        for thread in self._threads:
            thread.join()
        log.info("workers stopped owner=%s", self.owner)

    def _signal(self, reason: str, job_id: str | None = None) -> None:
        with self._lock:
            runs = [run for run in self._running if job_id is None or run.job_id == job_id]
        for run in runs:
            run.signal(reason)

    # --- the loop ------------------------------------------------------------------------------

    def _loop(self) -> None:
        owner = f"{self.owner}/{threading.current_thread().name}"
        failures = 0
        while not self._stopping.is_set():
            with self._condition:
                seen = self._wakeups
            try:
                job = self.store.claim(owner)
                piece = None if job is not None else self._claim_slice(owner)
            except Exception as error:
                failures += 1
                delay = CLAIM_BACKOFF.delay(failures)
                log.error("claiming a job failed owner=%s failures=%d retry_in_seconds=%.1f error=%s", self.owner,
                          failures, delay, type(error).__name__, exc_info=not is_transient_db_error(error))
                self._stopping.wait(delay)
                continue
            failures = 0
            if job is not None or piece is not None:
                try:
                    if job is not None:
                        self._run_job(job)
                    elif piece is not None:
                        try:
                            self._run_slice(*piece)
                        finally:
                            self._release_slice_slot()
                except Exception:  # the runs handle their errors; this is the last line, so the thread lives
                    failed = job or (piece[1] if piece else None)
                    log.exception("export worker error job_id=%s", failed.id if failed else None)
                continue
            with self._condition:
                if self._wakeups == seen and not self._stopping.is_set():
                    self._condition.wait(self.poll_interval)

    def _claim_slice(self, owner: str) -> tuple[Slice, Job] | None:
        """A slice, holding one of this process's slice slots (released by the caller), or None."""
        if not self._slice_slots.acquire(blocking=False):
            return None
        try:
            piece = self.slices.claim(owner)
        except BaseException:
            self._slice_slots.release()
            raise
        if piece is None:
            self._slice_slots.release()
        return piece

    def _release_slice_slot(self) -> None:
        """After a slice ran: a worker that found no free slot may take the next slice now."""
        self._slice_slots.release()
        self.wake()

    @contextlib.contextmanager
    def _running_as(self, job_id: str, renew: Callable[[], bool]) -> Iterator[_Run]:
        """Register a run for cancel and shutdown, with a heartbeat that renews its lease even when no
        progress is made (a long sort before the first row) and stops it when the lease is lost."""
        run = _Run(job_id)
        with self._lock:
            self._running.add(run)
        heartbeat = threading.Thread(target=self._heartbeat, args=(run, renew), daemon=True,
                                     name=f"heartbeat-{job_id}")
        heartbeat.start()
        try:
            yield run
        finally:
            with self._lock:
                self._running.discard(run)
            run.signal("done")
            heartbeat.join()

    def _heartbeat(self, run: _Run, renew: Callable[[], bool]) -> None:
        while not run.stop.wait(self.heartbeat_interval):
            try:
                held = renew()
            except Exception:  # a database hiccup: the next beat retries well within the lease
                log.exception("lease renewal failed job_id=%s", run.job_id)
                continue
            if not held:
                run.signal("lease lost")

    # --- a job: planning or assembling ---------------------------------------------------------

    def _run_job(self, job: Job) -> None:
        with self._running_as(job.id, lambda: self.store.renew_lease(job)) as run:
            planned = self.slices.is_planned(job.id)
            self.tracing.mark("claimed", job, {"userexport.attempt": job.attempts,
                                                  "userexport.work": "assemble" if planned else "plan"})
            try:
                if planned:  # its assembler died: take the assembly over
                    self._assemble(job)
                else:
                    self._plan(job, run)
            except ExportCancelled:
                if "shutdown" in run.reasons and not planned:
                    self._final_write(job, "release", lambda: self.store.release(job))
                log.info("job stopped job_id=%s tenant=%s reason=%s", job.id, job.tenant,
                         ",".join(run.reasons) or "job no longer held")
            except Exception as error:
                self._failed(job, error, job.attempts, retry=lambda: self._hand_back_job(job, planned))

    def _plan(self, job: Job, run: _Run) -> None:
        """Count the users and cut them into slices, which every worker then takes."""
        with self.tracing.span("planned", job) as span, self.engine.connect() as conn:
            export_reads(conn)
            total = count_users(conn, job.tenant, job.spec)
            ranges = key_ranges(conn, job.tenant, job.spec, total, self.slice_users)
            span.set_attributes({"userexport.users": total, "userexport.slices": len(ranges)})
        if run.stop.is_set() or self.slices.plan(job, ranges) is None:
            raise ExportCancelled()
        self.wake()  # the other idle workers of this replica take slices at once

    def _hand_back_job(self, job: Job, planned: bool) -> Job | bool | None:
        """A retry: a plan starts over; an assembly is left to the next claim, here or elsewhere."""
        return self.store.lapse(job) if planned else self.store.release(job)

    def _assemble(self, job: Job) -> None:
        """Join the parts (in key order) into the job's file, complete the job, delete the parts."""
        started = time.monotonic()
        key = object_key(job.tenant, job.id, job.filename)
        parts = self.slices.parts(job.id)
        sources = [part.key for part in parts]
        # The file is whole in storage once this span ends (one slice wrote it itself, else it joins the parts).
        with self.tracing.span("upload", job, {"userexport.parts": len(sources)}):
            if sources != [key]:
                self.storage.delete(key)  # an earlier assembler's, whose complete never happened
                self.storage.combine(sources, key, job.filename)
        written, size = sum(part.users for part in parts), sum(part.size_bytes for part in parts)
        done = self._final_write(job, "complete", lambda: self.store.complete(
            job, storage_key=key, written=written, size_bytes=size))
        if isinstance(done, _Unwritten):
            return  # the file stays: the rescuing assembler replaces it, or the sweep deletes it
        if done is None:
            self._discard(job, key)
        else:
            self.tracing.ended("completed", job, {"userexport.users": written, "userexport.bytes": size})
            log.info("export done job_id=%s tenant=%s users=%d parts=%d bytes=%d assemble_seconds=%.2f", job.id,
                     job.tenant, written, len(parts), size, time.monotonic() - started)
            self.metrics.export_done(done)
        self._delete_parts(job, [source for source in sources if source != key], then_forget_slices=True)

    def _delete_parts(self, job: Job, keys: list[str], *, then_forget_slices: bool = False) -> None:
        """Parts are not needed once the job's file exists or the job ended. A failed delete is
        logged and left to the reaper, which deletes the parts of ended jobs and then their slices."""
        try:
            for key in keys:
                self.storage.delete(key)
            if then_forget_slices:
                self.slices.forget(job.id)
        except Exception as error:
            log.warning("deleting export parts failed job_id=%s tenant=%s error=%s; the reaper retries", job.id,
                        job.tenant, type(error).__name__)

    # --- a slice -------------------------------------------------------------------------------

    def _run_slice(self, piece: Slice, job: Job) -> None:
        with self._running_as(job.id, lambda: self.slices.renew(piece)) as run, \
                self.metrics.slices_in_flight.track_inprogress():
            started = time.monotonic()
            whole = piece.key_range.after is None and piece.key_range.through is None
            key = object_key(job.tenant, job.id, job.filename if whole else piece.name)
            try:
                with self.tracing.span("slice", job, {"userexport.slice": piece.seq,
                                                         "userexport.attempt": piece.attempts}) as span:
                    written, size = self._export(job, piece, key, run.stop)
                    span.set_attributes({"userexport.users": written, "userexport.bytes": size})
            except ExportCancelled:
                if "shutdown" in run.reasons:
                    self._final_write(job, "slice hand back", lambda: self.slices.hand_back(piece))
                log.info("slice stopped job_id=%s tenant=%s slice=%d reason=%s", job.id, job.tenant, piece.seq,
                         ",".join(run.reasons) or "slice no longer held")
                return
            except Exception as error:
                self._failed(job, error, piece.attempts, retry=lambda: self.slices.hand_back(piece))
                return
            outcome = self._final_write(job, "slice done", lambda: self.slices.finish(
                piece, part_key=key, written=written, size_bytes=size))
            if isinstance(outcome, _Unwritten):
                return  # the slice's lease lapses and another worker exports it again
            recorded, assemble = outcome
            seconds = time.monotonic() - started
            log.info("slice done job_id=%s tenant=%s slice=%d users=%d seconds=%.2f recorded=%s", job.id,
                     job.tenant, piece.seq, written, seconds, recorded)
            if not recorded:
                self._discard(job, key) if whole else self._delete_parts(job, [key])
                return
            self.metrics.slice_done(written, size, seconds)
        if assemble is not None:
            with self._running_as(job.id, lambda: self.store.renew_lease(assemble)):
                try:
                    self._assemble(assemble)
                except Exception as error:
                    self._failed(assemble, error, assemble.attempts,
                                 retry=lambda: self._hand_back_job(assemble, planned=True))

    def _export(self, job: Job, piece: Slice, key: str, stop: threading.Event) -> tuple[int, int]:
        """Export the slice into its part; returns the users written and the part's size in bytes."""
        if piece.attempts > 1 and key.endswith(job.filename):
            # An earlier attempt may have committed the file before its replica died; objects are
            # never overwritten, so clear the way (that file was whole, and so will this one be).
            self.storage.delete(key)
        with self.engine.connect() as conn:
            export_reads(conn)
            writer = self.storage.open_writer(key, key.rsplit("/", 1)[-1])
            counted = _Counted(writer)
            try:
                written = run_export(conn, job.tenant, job.spec, counted, gzip_level=self.gzip_level,
                                     progress=_SliceProgress(self.slices, piece, job.users_total, stop),
                                     batch_rows=batch_rows(job.users_total), key_range=piece.key_range)
                writer.commit()
            except BaseException:
                writer.abort()
                raise
        return written, counted.size

    # --- failures ------------------------------------------------------------------------------

    def _failed(self, job: Job, error: Exception, attempts: int, retry: Callable[[], object]) -> None:
        """Retry a transient failure (after a backoff, by handing the work back) while attempts are
        left; otherwise fail the job with a message naming the cause and nothing internal."""
        if isinstance(error, StorageError):
            cause = str(error)
        elif is_transient_db_error(error):
            cause = DATABASE_UNAVAILABLE
        else:
            log.exception("export failed job_id=%s tenant=%s", job.id, job.tenant)
            self._fail(job, FAILED_INTERNALLY)
            return
        if attempts < self.attempts:
            delay = JOB_RETRY_BACKOFF.delay(attempts)
            log.warning("export attempt failed, will retry job_id=%s tenant=%s attempt=%d/%d retry_in_seconds=%.1f "
                        "cause=%r error=%s", job.id, job.tenant, attempts, self.attempts, delay, cause,
                        type(error).__name__)
            self._stopping.wait(delay)  # the heartbeat keeps the lease meanwhile
            self._final_write(job, "hand back", retry)
            return
        log.error("export failed job_id=%s tenant=%s attempts=%d cause=%r error=%s", job.id, job.tenant,
                  attempts, cause, type(error).__name__)
        self._fail(job, f"The export failed after {attempts} attempt{'s' * (attempts != 1)}: {cause}")

    def _fail(self, job: Job, message: str) -> None:
        self.tracing.ended("failed", job, error=message)
        self._final_write(job, "fail", lambda: self.store.fail(job, message))

    def _final_write(self, job: Job, what: str, write: Callable[[], _T]) -> _T | _Unwritten:
        """A last write of some work, retried over transient database errors; if it still cannot be
        made, the work keeps its lease until it lapses and another claim takes it over."""
        try:
            return retry_transient(write, what=f"{what} job_id={job.id}", attempts=FINAL_WRITE_ATTEMPTS,
                                   backoff=FINAL_WRITE_BACKOFF)
        except Exception as error:
            log.error("%s could not be written, left to lease rescue job_id=%s tenant=%s error=%s", what,
                      job.id, job.tenant, type(error).__name__, exc_info=not is_transient_db_error(error))
            return _UNWRITTEN

    def _discard(self, job: Job, key: str) -> None:
        """The job was cancelled, expired or timed out while its file was committed: delete the file,
        unless the job holds it after all (a complete that committed though its reply was lost) or
        another attempt runs it now (that attempt clears the key itself before it starts)."""
        try:
            current = self.store.get_any(job.id)
            if current is not None and (current.storage_key == key or not current.status.is_terminal):
                return
            self.storage.delete(key)
            log.info("export discarded job_id=%s tenant=%s", job.id, job.tenant)
        except Exception as error:  # the orphan sweep deletes it later
            log.error("discarding an export file failed job_id=%s tenant=%s error=%s", job.id, job.tenant,
                      type(error).__name__)


class _Unwritten:
    """A final write that could not be made (see WorkerPool._final_write)."""


_UNWRITTEN = _Unwritten()
_T = TypeVar("_T")
