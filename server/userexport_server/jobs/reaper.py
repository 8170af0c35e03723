"""The reaper: times out stuck exports, expires jobs after their lifetime, deletes files and the parts of
ended jobs, purges, prunes the users change log, and sweeps storage for orphans (partial files of killed
processes, files of jobs gone or finished).

No step holds a transaction while it deletes files, and each step's error is logged and retried
at the next round, so one failure neither stops the others nor kills the thread.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

from userexport_server.db.faults import DatabaseUnavailable
from userexport_server.errors import StorageError
from userexport_server.export.changes import ChangeLog
from userexport_server.jobs.files import delete_export_file
from userexport_server.jobs.model import ACTIVE, Job, JobStatus
from userexport_server.jobs.slices import SliceStore
from userexport_server.jobs.store import JobStore
from userexport_server.logs import EventLog
from userexport_server.storage.base import Storage, StoredEntry

log = EventLog(__name__)


class Reaper:
    """Rounds every `interval` seconds, the first at start; the orphan sweep in the first round and
    then every `sweep_interval` seconds. A partial file younger than `orphan_grace` seconds (by its
    last write) is kept while its job is pending or processing: it may be another replica's
    running export."""

    def __init__(self, store: JobStore, storage: Storage, interval: float, *, orphan_grace: float = 3600.0,
                 sweep_interval: float = 600.0, changes: ChangeLog | None = None) -> None:
        self.store, self.slices, self.storage, self.interval = store, SliceStore(store), storage, interval
        self.changes = changes
        self.orphan_grace, self.sweep_interval = orphan_grace, sweep_interval
        self._next_sweep = 0.0  # monotonic: the first round sweeps
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="reaper", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop after the step under way; a step stuck in the database or storage is not waited for
        past `timeout` (the thread is a daemon, and every step is safe to cut short)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("reaper did not stop in time; left behind", waited_seconds=timeout)

    def run_once(self) -> None:
        steps: tuple[tuple[str, Callable[[], object]], ...] = (
            ("timeouts", self.store.fail_timed_out), ("expiry", self.store.expire_due),
            ("file deletes", self.delete_expired_files), ("slice parts", self.delete_finished_parts),
            ("purge", self.store.purge_expired),
            *((("change log", self.changes.prune),) if self.changes is not None else ()),
            ("orphan sweep", self._sweep_when_due))
        for name, step in steps:
            try:
                step()
            except (DatabaseUnavailable, StorageError) as exc:  # expected while either is away: no traceback
                log.warning("reaper step failed; retried next round", step=name, error=exc)
            except Exception:
                log.exception("reaper step failed", step=name)

    def delete_expired_files(self) -> int:
        """Delete the files of expired and revoked jobs; one that fails keeps its key and is retried."""
        return sum(delete_export_file(self.store, self.storage, job) for job in self.store.expired_with_files())

    def delete_finished_parts(self) -> int:
        """Delete the parts and slices of jobs that ended without their assembler cleaning up
        (cancelled, failed, expired mid-export, or an assembler that died); returns the jobs cleared."""
        cleared = 0
        for job_id, keys in self.slices.of_finished_jobs().items():
            for key in keys:
                self.storage.delete(key)
            self.slices.forget(job_id)
            log.info("slice parts deleted", job_id=job_id, parts=len(keys))
            cleared += 1
        return cleared

    def sweep(self) -> int:
        """Remove what no job needs (see `_keep`); returns how many files and folders went."""
        removed = self.storage.sweep(self._keeper())
        if removed:
            log.info("orphan sweep removed", count=removed)
        return removed

    def _sweep_when_due(self) -> None:
        if time.monotonic() >= self._next_sweep:
            self._next_sweep = time.monotonic() + self.sweep_interval
            self.sweep()

    def _keeper(self) -> Callable[[StoredEntry], bool]:
        """The sweep's rule, with each job read once per sweep (terminal states never change back,
        and an active job read as active is only kept, so a stale answer is always the safe one)."""
        jobs: dict[tuple[str, str], Job | None] = {}

        def keep(entry: StoredEntry) -> bool:
            if (entry.tenant, entry.job_id) not in jobs:
                jobs[entry.tenant, entry.job_id] = self.store.get(entry.tenant, entry.job_id)
            return _keep(entry, jobs[entry.tenant, entry.job_id], self.orphan_grace)

        return keep

    def _loop(self) -> None:
        while True:
            try:
                self.run_once()
            except Exception:  # run_once catches per step; this only guards the thread itself
                log.exception("reaper round failed")
            if self._stop.wait(self.interval):
                return


def _keep(entry: StoredEntry, job: Job | None, orphan_grace: float) -> bool:
    """Whether the sweep leaves `entry` alone.

    An empty job folder: while its job may still write into it (pending or processing). A partial
    file: the same, and only for `orphan_grace` seconds after its last write (a killed process's
    file of a job that was then rescued). A file: while its job is active (a committed file whose
    `complete` is being written), or is the job's file (completed, or expired with the delete
    still to do, which delete_expired_files owns). Anything of a job that is gone, failed or
    cancelled goes.
    """
    active = job is not None and job.status in ACTIVE
    if entry.name is None:
        return active
    if entry.partial:
        return active and entry.age_seconds < orphan_grace
    return job is not None and (active or (job.status in (JobStatus.COMPLETED, JobStatus.EXPIRED)
                                           and job.storage_key == entry.key))
