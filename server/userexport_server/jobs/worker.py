"""The worker pool: threads that claim jobs, run the export engine into storage, and report progress."""
from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable

from sqlalchemy import Engine

from userexport_server.db.engine import unbounded_statements
from userexport_server.db.faults import is_transient_db_error
from userexport_server.errors import StorageError
from userexport_server.export.engine import DEFAULT_BATCH_ROWS, ExportCancelled, run_export
from userexport_server.export.sql import count_users
from userexport_server.jobs.model import Job
from userexport_server.jobs.retry import Backoff, retry_transient
from userexport_server.jobs.store import JobStore
from userexport_server.storage.base import ObjectWriter, Storage, object_key

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


def batch_rows(total: int) -> int:
    """Rows between progress calls: at most half a percent of the export, so watchers get every 1%."""
    return max(100, min(DEFAULT_BATCH_ROWS, total // 200))


class _Progress:
    """The engine's progress callback: writes progress at most once per 1% or per second, and says stop
    when the job was cancelled here, or is no longer this worker's (cancelled, expired or timed out
    elsewhere), or the server is shutting down."""

    def __init__(self, store: JobStore, job: Job, total: int, stop: threading.Event) -> None:
        self.store, self.job, self.total, self.stop = store, job, total, stop
        self.started = self.last_write = time.monotonic()
        self.last_percentage = 0
        self.failures, self.retry_at = 0, 0.0

    def __call__(self, written: int) -> bool:
        if self.stop.is_set():
            return False
        now = time.monotonic()
        percentage = written * 100 // self.total if self.total else 100
        if (percentage > self.last_percentage or now - self.last_write >= 1.0) and now >= self.retry_at:
            left = round((now - self.started) / written * (self.total - written)) if written else None
            try:
                job = self.store.progress(self.job, written=written, total=self.total, time_left=left)
            except Exception as error:
                if not is_transient_db_error(error):
                    raise
                # Progress is for watchers; the lease (heartbeat) and the final write are what
                # count, so a stalled database slows the export down instead of stopping it.
                self.failures += 1
                self.retry_at = time.monotonic() + PROGRESS_BACKOFF.delay(self.failures)
                log.warning("progress write failed, export goes on job_id=%s failures=%d error=%s", self.job.id,
                            self.failures, type(error).__name__)
                return True
            if job is None:
                return False
            self.job, self.last_write, self.last_percentage, self.failures = job, now, percentage, 0
        return True


class _Counted:
    """A storage writer that counts what passes through: the file's size, for the retained-bytes quota."""

    def __init__(self, writer: ObjectWriter) -> None:
        self.writer, self.size = writer, 0

    def write(self, data: bytes) -> None:
        self.writer.write(data)
        self.size += len(data)


class WorkerPool:
    """Export threads that never die of an error: each is caught, logged with the job's id, and
    the thread goes on (see healthy()). A job that hit a transient database or storage error runs
    again, up to `attempts` claims, and then fails naming the cause."""

    def __init__(self, store: JobStore, engine: Engine, storage: Storage, *, workers: int,
                 poll_interval: float, gzip_level: int, lease_seconds: float, attempts: int = 3) -> None:
        self.store, self.engine, self.storage = store, engine, storage
        self.attempts = attempts
        self.heartbeat_interval = lease_seconds / 3
        self.poll_interval, self.gzip_level = poll_interval, gzip_level
        self.owner = f"{uuid.uuid4().hex[:12]}"
        self._threads = [threading.Thread(target=self._loop, name=f"export-worker-{i}", daemon=True)
                         for i in range(workers)]
        self._wakeups = 0
        self._condition = threading.Condition()
        self._stopping = threading.Event()
        self._running: dict[str, tuple[threading.Event, list[str]]] = {}
        self._lock = threading.Lock()
        self._started = False

    def start(self) -> None:
        for thread in self._threads:
            thread.start()
        self._started = True
        log.info("workers started owner=%s count=%d", self.owner, len(self._threads))

    def wake(self) -> None:
        """A job was created here: idle workers claim it now rather than at their next poll."""
        with self._condition:
            self._wakeups += 1
            self._condition.notify_all()

    def cancel_local(self, job_id: str) -> None:
        """Stop a job this replica runs, at once (other replicas notice at their next progress step)."""
        self._signal(job_id, "cancelled")

    def healthy(self) -> str | None:
        """None while every worker thread is alive, else why not (cheap: for a health check each second)."""
        if not self._started or self._stopping.is_set():
            return "export workers are not running (not started yet, or stopping)"
        dead = sum(not thread.is_alive() for thread in self._threads)
        return f"{dead} of {len(self._threads)} export workers are dead" if dead else None

    def running(self) -> list[str]:
        with self._lock:
            return list(self._running)

    def shutdown(self, grace: float) -> None:
        """Stop claiming; let running exports finish for `grace` seconds, then hand the rest back."""
        self._stopping.set()
        self.wake()
        deadline = time.monotonic() + grace
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        for job_id in self.running():
            self._signal(job_id, "shutdown")
        for thread in self._threads:
            thread.join()
        log.info("workers stopped owner=%s", self.owner)

    def _signal(self, job_id: str, reason: str) -> None:
        with self._lock:
            entry = self._running.get(job_id)
        if entry is not None:
            entry[1].append(reason)
            entry[0].set()

    def _loop(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            with self._condition:
                seen = self._wakeups
            try:
                job = self.store.claim(f"{self.owner}/{threading.current_thread().name}")
            except Exception as error:
                failures += 1
                delay = CLAIM_BACKOFF.delay(failures)
                log.error("claiming a job failed owner=%s failures=%d retry_in_seconds=%.1f error=%s", self.owner,
                          failures, delay, type(error).__name__, exc_info=not is_transient_db_error(error))
                self._stopping.wait(delay)
                continue
            failures = 0
            if job is not None:
                try:
                    self._run(job)
                except Exception:  # _run handles its errors; this is the last line, so the thread lives
                    log.exception("export worker error job_id=%s tenant=%s", job.id, job.tenant)
                continue
            with self._condition:
                if self._wakeups == seen and not self._stopping.is_set():
                    self._condition.wait(self.poll_interval)

    def _run(self, job: Job) -> None:
        stop, reasons = threading.Event(), list[str]()
        with self._lock:
            self._running[job.id] = (stop, reasons)
        key = object_key(job.tenant, job.id, job.filename)
        started = time.monotonic()
        heartbeat = threading.Thread(target=self._heartbeat, args=(job, stop, reasons), daemon=True,
                                     name=f"heartbeat-{job.id}")
        heartbeat.start()
        try:
            written, size = self._export(job, key, stop)
        except ExportCancelled:
            if "shutdown" in reasons:
                self._final_write(job, "release", lambda: self.store.release(job))
            log.info("export stopped job_id=%s tenant=%s reason=%s", job.id, job.tenant,
                     ",".join(reasons) or "job no longer held")
        except Exception as error:
            self._failed(job, error)
        else:
            seconds = time.monotonic() - started
            done = self._final_write(job, "complete", lambda: self.store.complete(
                job, storage_key=key, written=written, size_bytes=size))
            if done is _UNWRITTEN:
                pass  # the file stays: a rescuing attempt deletes it before it starts, or the sweep does
            elif done is None:
                self._discard(job, key)
            else:
                log.info("export done job_id=%s tenant=%s users=%d seconds=%.2f users_per_s=%.0f", job.id,
                         job.tenant, written, seconds, written / seconds if seconds else 0.0)
        finally:
            with self._lock:
                del self._running[job.id]
            reasons.append("done")
            stop.set()
            heartbeat.join()

    def _failed(self, job: Job, error: Exception) -> None:
        """Retry a transient failure (after a backoff, by handing the job back) while attempts are
        left; otherwise fail the job with a message naming the cause and nothing internal."""
        if isinstance(error, StorageError):
            cause = str(error)
        elif is_transient_db_error(error):
            cause = DATABASE_UNAVAILABLE
        else:
            log.exception("export failed job_id=%s tenant=%s", job.id, job.tenant)
            self._final_write(job, "fail", lambda: self.store.fail(job, FAILED_INTERNALLY))
            return
        if job.attempts < self.attempts:
            delay = JOB_RETRY_BACKOFF.delay(job.attempts)
            log.warning("export attempt failed, will retry job_id=%s tenant=%s attempt=%d/%d retry_in_seconds=%.1f "
                        "cause=%r error=%s", job.id, job.tenant, job.attempts, self.attempts, delay, cause,
                        type(error).__name__)
            self._stopping.wait(delay)  # the heartbeat keeps the lease meanwhile
            self._final_write(job, "release", lambda: self.store.release(job))
            return
        log.error("export failed job_id=%s tenant=%s attempts=%d cause=%r error=%s", job.id, job.tenant,
                  job.attempts, cause, type(error).__name__)
        message = f"The export failed after {job.attempts} attempt{'s' * (job.attempts != 1)}: {cause}"
        self._final_write(job, "fail", lambda: self.store.fail(job, message))

    def _final_write(self, job: Job, what: str, write: Callable[[], Job | None]) -> Job | _Unwritten | None:
        """A job's last write, retried over transient database errors; if it still cannot be made,
        the job keeps its lease until it lapses and another claim (lease rescue) takes it."""
        try:
            return retry_transient(write, what=f"job {what} job_id={job.id}", attempts=FINAL_WRITE_ATTEMPTS,
                                   backoff=FINAL_WRITE_BACKOFF)
        except Exception as error:
            log.error("job %s could not be written, left to lease rescue job_id=%s tenant=%s error=%s", what,
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

    def _heartbeat(self, job: Job, stop: threading.Event, reasons: list[str]) -> None:
        """Renew the lease while the export runs, even when no progress is made (a long sort before
        the first row); if the job was taken away, tell the export to stop."""
        while not stop.wait(self.heartbeat_interval):
            try:
                held = self.store.renew_lease(job)
            except Exception:  # a database hiccup: the next beat retries well within the lease
                log.exception("lease renewal failed job_id=%s", job.id)
                continue
            if not held:
                reasons.append("lease lost")
                stop.set()

    def _export(self, job: Job, key: str, stop: threading.Event) -> tuple[int, int]:
        """Run the export into storage; returns the users written and the file's size in bytes."""
        with self.engine.connect() as conn:
            unbounded_statements(conn)
            total = count_users(conn, job.tenant, job.spec)
            current = self.store.progress(job, written=0, total=total, time_left=None)
            if current is None:
                raise ExportCancelled()
            if job.attempts > 1:
                # An earlier attempt may have committed its file before its replica died; objects are
                # never overwritten, so clear the way (that file was whole, and so will this one be).
                self.storage.delete(key)
            writer = self.storage.open_writer(key, job.filename)
            counted = _Counted(writer)
            try:
                written = run_export(conn, job.tenant, job.spec, counted, gzip_level=self.gzip_level,
                                     progress=_Progress(self.store, current, total, stop),
                                     batch_rows=batch_rows(total))
                writer.commit()
            except BaseException:
                writer.abort()
                raise
        return written, counted.size


class _Unwritten:
    """A final write that could not be made (see WorkerPool._final_write)."""


_UNWRITTEN = _Unwritten()
