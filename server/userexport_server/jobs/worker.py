"""The worker pool: threads that claim work and run its phase (jobs/phases.py), and a shutdown that
never waits longer than its grace period plus a few seconds."""
from __future__ import annotations

import threading
import time
import uuid

from userexport.backoff import Backoff
from userexport_server.db.faults import DatabaseUnavailable
from userexport_server.db.standby import ExportReads
from userexport_server.jobs.events import EventBus, JobChange
from userexport_server.jobs.failures import FailurePolicy
from userexport_server.jobs.model import Job, JobStatus
from userexport_server.jobs.phases import Phases
from userexport_server.jobs.runs import Runs
from userexport_server.jobs.slices import Slice, SliceStore
from userexport_server.jobs.store import JobStore
from userexport_server.logs import EventLog
from userexport_server.metrics import Metrics
from userexport_server.storage.base import Storage
from userexport_server.tracing import Tracing

log = EventLog(__name__)
# Between failed claims.
CLAIM_BACKOFF = Backoff(initial=0.5, maximum=30.0)
# After the grace period, how long stopped work gets to hand itself back before shutdown goes on.
STOP_SECONDS = 3.0


class WorkerPool:
    """Export threads that never die of an error: each is caught, logged with the job's id, and the
    thread goes on (see healthy()). Each thread claims, in turn, a job to plan or assemble
    (JobStore.claim) or else a slice of a running job (SliceStore.claim), so the workers of every
    replica share each job's slices. The pool hears of every job change on the bus: a new job wakes
    idle workers, an ended one stops its work here."""

    def __init__(self, store: JobStore, reads: ExportReads, storage: Storage, bus: EventBus, *, workers: int,
                 poll_interval: float, gzip_level: int, lease_seconds: float, stall_seconds: float,
                 metrics: Metrics, tracing: Tracing, attempts: int = 3, slice_users: int = 100_000) -> None:
        self.store, self.slices, self.bus = store, SliceStore(store), bus
        self.workers, self.poll_interval = workers, poll_interval
        self.owner = uuid.uuid4().hex[:12]
        self.runs = Runs(lease_seconds=lease_seconds, stall_seconds=stall_seconds)
        self._stopping = threading.Event()
        self.phases = Phases(store=store, slices=self.slices, reads=reads, storage=storage, runs=self.runs,
                             policy=FailurePolicy(store, tracing, attempts=attempts, stopping=self._stopping),
                             tracing=tracing, metrics=metrics, gzip_level=gzip_level, slice_users=slice_users,
                             wake=self.wake)
        self._threads: list[threading.Thread] = []
        self._wakeups = 0
        self._condition = threading.Condition()
        # SQLite formats inside this process, where two slices at once ran 1.2-1.75x slower than
        # one after the other (its allocator's mutex and the GIL are shared), so one slice runs at
        # a time there; a PostgreSQL slice's formatting runs in its own backend.
        self._slice_slots = threading.BoundedSemaphore(1 if store.engine.dialect.name == "sqlite" else max(1, workers))

    def start(self) -> None:
        self.bus.observe(self._on_change)
        self._threads = [threading.Thread(target=self._loop, name=f"export-worker-{i}", daemon=True)
                         for i in range(self.workers)]
        for thread in self._threads:
            thread.start()
        log.info("workers started", owner=self.owner, count=self.workers, slice_users=self.phases.slice_users)

    def wake(self) -> None:
        """Work may wait: idle workers claim now rather than at their next poll."""
        with self._condition:
            self._wakeups += 1
            self._condition.notify_all()

    def healthy(self) -> str | None:
        """None while every worker thread is alive and no run is stalled, else why not (cheap: for a
        health check each second)."""
        if not self._threads or self._stopping.is_set():
            return "export workers are not running (not started yet, or stopping)"
        dead = sum(not thread.is_alive() for thread in self._threads)
        if dead:
            return f"{dead} of {len(self._threads)} export workers are dead"
        return self.runs.problem()

    def running(self) -> list[str]:
        """The jobs with work running on this replica."""
        return self.runs.job_ids()

    def shutdown(self, grace: float) -> None:
        """Stop claiming; let running work finish for `grace` seconds, then cancel the rest in place
        (its queries too) so that it is handed back, and wait at most STOP_SECONDS more for that."""
        self._stopping.set()
        if not self._threads:
            return
        self.wake()
        deadline = time.monotonic() + grace
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        stopped = self.runs.stop("shutdown", cancel=True)
        deadline = time.monotonic() + STOP_SECONDS
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        stuck = [thread.name for thread in self._threads if thread.is_alive()]
        if stuck:
            log.error("workers did not stop in time, left behind", owner=self.owner, threads=",".join(stuck))
        log.info("workers stopped", owner=self.owner, cancelled_runs=stopped)

    def _on_change(self, change: JobChange) -> None:
        """A job was created (here or elsewhere): claim it; it ended: stop its work here at once."""
        if change.status == JobStatus.PENDING:
            self.wake()
        elif change.status.is_terminal:
            self.runs.stop(change.status.value, change.job_id, cancel=True)

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
                log.error("claiming work failed", owner=self.owner, failures=failures, retry_in_seconds=round(delay, 1),
                          error=error, exc_info=not isinstance(error, DatabaseUnavailable))
                self._stopping.wait(delay)
                continue
            failures = 0
            if job is not None or piece is not None:
                self._run(job, piece)
                continue
            with self._condition:
                if self._wakeups == seen and not self._stopping.is_set():
                    self._condition.wait(self.poll_interval)

    def _run(self, job: Job | None, piece: tuple[Slice, Job] | None) -> None:
        try:
            if job is not None:
                self.phases.run_job(job)
            elif piece is not None:
                try:
                    self.phases.run_slice(*piece)
                finally:
                    self._slice_slots.release()
                    self.wake()  # a worker that found no free slot may take the next slice now
        except Exception:  # the phases handle their errors; this is the last line, so the thread lives
            failed = job or (piece[1] if piece else None)
            log.exception("export worker error", job_id=failed.id if failed else None)

    def _claim_slice(self, owner: str) -> tuple[Slice, Job] | None:
        """A slice, holding one of this process's slice slots (released by _run), or None."""
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
