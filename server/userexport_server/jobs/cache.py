"""The newest version of recently seen jobs, kept current by the event feed, so reads skip the database.

Every committed change of a job is published with its new version (jobs/store.py), in process and,
on PostgreSQL, to the other replicas as a notification that names the version. So a job held here
is the newest version unless a notification has been missed, and the feed says when it may have
been (the listener lost its connection): then the cache is emptied and bypassed until it is back.

Only three changes skip the version, and all of them touch expired jobs (forget_file, the request id
handed on, the purge), so an expired job, or one whose expiry time has passed, is never served
from here: a terminal state read from the cache is always still true.
"""
from __future__ import annotations

import datetime as dt
import threading
from collections import OrderedDict

from userexport_server.jobs.model import Job, JobStatus, now_utc

# Jobs (or, for a job changed elsewhere, just its newest version) kept; the least recently used go first.
CAPACITY = 10_000


class JobCache:
    def __init__(self, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        # job id -> the job at its newest known version, or that version alone when only a
        # notification told of it (the job itself is then read from the database).
        self._entries: OrderedDict[str, Job | int] = OrderedDict()
        self._lock = threading.Lock()
        # Bumped by clear(): a database read begun before it may predate a missed notification.
        self.generation = 0

    def offer(self, job: Job, generation: int | None = None) -> None:
        """A version of `job` was published, or read from the database (pass the `generation` taken
        before the read): keep it unless a newer one is known."""
        with self._lock:
            if generation is not None and generation != self.generation:
                return
            known = self._entries.get(job.id)
            if known is None or _version(known) <= job.version:
                self._put(job.id, job)

    def outdate(self, job_id: str, version: int) -> None:
        """Another replica committed `version` of the job: drop what is held if it is older."""
        with self._lock:
            known = self._entries.get(job_id)
            if known is None or _version(known) < version:
                self._put(job_id, version)

    def get(self, job_id: str, now: dt.datetime | None = None) -> Job | None:
        """The job at its newest version, if held and still servable (see the module's docstring)."""
        with self._lock:
            job = self._entries.get(job_id)
            if not isinstance(job, Job):
                return None
            self._entries.move_to_end(job_id)
        if job.status == JobStatus.EXPIRED or (now or now_utc()) >= job.expires_at:
            return None
        return job

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.generation += 1

    def __len__(self) -> int:
        return len(self._entries)

    def _put(self, job_id: str, entry: Job | int) -> None:
        self._entries[job_id] = entry
        self._entries.move_to_end(job_id)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)


def _version(entry: Job | int) -> int:
    return entry if isinstance(entry, int) else entry.version
