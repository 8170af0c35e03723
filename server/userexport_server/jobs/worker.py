"""The worker pool: threads that claim jobs, run the export engine into storage, and report progress."""
from __future__ import annotations

import logging
import threading
import time
import uuid

from sqlalchemy import Engine

from userexport_server.db.engine import unbounded_statements
from userexport_server.errors import StorageError
from userexport_server.export.engine import DEFAULT_BATCH_ROWS, ExportCancelled, run_export
from userexport_server.export.sql import count_users
from userexport_server.jobs.model import Job
from userexport_server.jobs.store import JobStore
from userexport_server.storage.base import Storage, object_key

log = logging.getLogger(__name__)

FAILED_INTERNALLY = "The export failed because of an internal error; it is logged under this job's id."


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

    def __call__(self, written: int) -> bool:
        if self.stop.is_set():
            return False
        now = time.monotonic()
        percentage = written * 100 // self.total if self.total else 100
        if percentage > self.last_percentage or now - self.last_write >= 1.0:
            left = round((now - self.started) / written * (self.total - written)) if written else None
            job = self.store.progress(self.job, written=written, total=self.total, time_left=left)
            if job is None:
                return False
            self.job, self.last_write, self.last_percentage = job, now, percentage
        return True


class WorkerPool:
    def __init__(self, store: JobStore, engine: Engine, storage: Storage, *, workers: int,
                 poll_interval: float, gzip_level: int, lease_seconds: float) -> None:
        self.store, self.engine, self.storage = store, engine, storage
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

    def start(self) -> None:
        for thread in self._threads:
            thread.start()
        log.info("workers started owner=%s count=%d", self.owner, len(self._threads))

    def wake(self) -> None:
        """A job was created here: idle workers claim it now rather than at their next poll."""
        with self._condition:
            self._wakeups += 1
            self._condition.notify_all()

    def cancel_local(self, job_id: str) -> None:
        """Stop a job this replica runs, at once (other replicas notice at their next progress step)."""
        self._signal(job_id, "cancelled")

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
        while not self._stopping.is_set():
            with self._condition:
                seen = self._wakeups
            try:
                job = self.store.claim(f"{self.owner}/{threading.current_thread().name}")
            except Exception:
                log.exception("claiming a job failed owner=%s", self.owner)
                job = None
            if job is not None:
                self._run(job)
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
            written = self._export(job, key, stop)
        except ExportCancelled:
            if "shutdown" in reasons:
                self.store.release(job)
            log.info("export stopped job_id=%s tenant=%s reason=%s", job.id, job.tenant,
                     ",".join(reasons) or "job no longer held")
        except StorageError as exc:
            log.error("export failed job_id=%s tenant=%s error=%s", job.id, job.tenant, exc)
            self.store.fail(job, f"Export failed: {exc}")
        except Exception:
            log.exception("export failed job_id=%s tenant=%s", job.id, job.tenant)
            self.store.fail(job, FAILED_INTERNALLY)
        else:
            seconds = time.monotonic() - started
            if self.store.complete(job, storage_key=key, written=written) is None:
                # Cancelled, expired or timed out while the file was being committed: drop it.
                self.storage.delete(key)
                log.info("export discarded job_id=%s tenant=%s", job.id, job.tenant)
            else:
                log.info("export done job_id=%s tenant=%s users=%d seconds=%.2f users_per_s=%.0f", job.id,
                         job.tenant, written, seconds, written / seconds if seconds else 0.0)
        finally:
            with self._lock:
                del self._running[job.id]
            reasons.append("done")
            stop.set()
            heartbeat.join()

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

    def _export(self, job: Job, key: str, stop: threading.Event) -> int:
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
            try:
                written = run_export(conn, job.tenant, job.spec, writer, gzip_level=self.gzip_level,
                                     progress=_Progress(self.store, current, total, stop),
                                     batch_rows=batch_rows(total))
                writer.commit()
            except BaseException:
                writer.abort()
                raise
        return written
