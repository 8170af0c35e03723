"""What happens to work that failed: retried while attempts are left if the fault was the database's
or storage's, else the job fails with a message that names the cause and nothing internal; and
the last write of any work, retried over database faults before it is left to lease rescue."""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

from userexport.backoff import Backoff
from userexport_server.db.faults import DatabaseUnavailable
from userexport_server.errors import ServiceError, StorageError
from userexport_server.jobs.model import Job
from userexport_server.jobs.retry import retry_transient
from userexport_server.jobs.store import JobStore
from userexport_server.logs import EventLog
from userexport_server.tracing import Tracing

log = EventLog(__name__)
T = TypeVar("T")

FAILED_INTERNALLY = "The export failed because of an internal error; it is logged under this job's id."
DATABASE_UNAVAILABLE = "the database was unavailable (unreachable, or locked for too long)"
# A job's final write (complete, fail, release) is tried this often before the job is left to lease
# rescue; with SQLite's busy timeout on each try, that rides out a lock of about 6 x busy + 12 s.
FINAL_WRITE_ATTEMPTS = 6
FINAL_WRITE_BACKOFF = Backoff(initial=0.2, maximum=5.0)
# Between two attempts of work that hit a transient fault.
JOB_RETRY_BACKOFF = Backoff(initial=1.0, maximum=30.0)


class Unwritten:
    """A final write that could not be made (see FailurePolicy.final_write)."""


UNWRITTEN = Unwritten()


class FailurePolicy:
    """`attempts` claims per job (or slice) before a transient fault fails the job; `stopping` cuts
    the wait between attempts short on shutdown."""

    def __init__(self, store: JobStore, tracing: Tracing, *, attempts: int, stopping: threading.Event) -> None:
        self.store, self.tracing, self.attempts, self.stopping = store, tracing, attempts, stopping

    def failed(self, job: Job, error: Exception, attempts: int, retry: Callable[[], object]) -> None:
        """Retry a transient failure (after a backoff, by handing the work back) while attempts are
        left; otherwise fail the job with a message naming the cause."""
        if isinstance(error, ServiceError):  # a condition the caller can act on, told as it is (never retried)
            log.warning("export failed", job_id=job.id, tenant=job.tenant, reason=error.reason, error=error)
            self.fail(job, error.message)
            return
        if isinstance(error, StorageError):
            cause = str(error)
        elif isinstance(error, DatabaseUnavailable):
            cause = DATABASE_UNAVAILABLE
        else:
            log.exception("export failed", job_id=job.id, tenant=job.tenant)
            self.fail(job, FAILED_INTERNALLY)
            return
        if attempts < self.attempts:
            delay = JOB_RETRY_BACKOFF.delay(attempts)
            log.warning("export attempt failed, will retry", job_id=job.id, tenant=job.tenant,
                        attempt=f"{attempts}/{self.attempts}", retry_in_seconds=round(delay, 1), cause=cause,
                        error=error)
            self.stopping.wait(delay)  # the heartbeat keeps the lease meanwhile
            self.final_write(job, "hand back", retry)
            return
        log.error("export failed", job_id=job.id, tenant=job.tenant, attempts=attempts, cause=cause, error=error)
        self.fail(job, f"The export failed after {attempts} attempt{'s' * (attempts != 1)}: {cause}")

    def fail(self, job: Job, message: str) -> None:
        self.tracing.ended("failed", (job.id, job.trace_parent), error=message)
        self.final_write(job, "fail", lambda: self.store.fail(job, message))

    def final_write(self, job: Job, what: str, write: Callable[[], T]) -> T | Unwritten:
        """A last write of some work, retried over database faults; if it still cannot be made, the
        work keeps its lease until it lapses and another claim takes it over."""
        try:
            return retry_transient(write, what=what, job_id=job.id, attempts=FINAL_WRITE_ATTEMPTS,
                                   backoff=FINAL_WRITE_BACKOFF)
        except DatabaseUnavailable as error:
            log.error(f"{what} could not be written, left to lease rescue", job_id=job.id, tenant=job.tenant,
                      error=error)
        except Exception:
            log.exception(f"{what} could not be written, left to lease rescue", job_id=job.id, tenant=job.tenant)
        return UNWRITTEN
