"""Job events across replicas: PostgreSQL LISTEN/NOTIFY carries "job changed" to every replica.

The notification is sent by a trigger on the jobs table (migration 0005), so it is part of the
transaction that made the change: committed means announced, whatever happens to the writer after.
Each replica's listener hands the change to its bus (the cache drops older versions, the worker
pool hears of new and ended jobs) and, only for jobs watched here, reads the job once and fans it
out. Payloads carry ids, a version and a status, so no size limit applies, and the origin (the
writer's `userexport.origin` setting, see db/engine.py), so a replica skips its own echoes: its
own changes reach its bus in process, right after the commit.

Any database role may NOTIFY on the channel, so payloads are untrusted: each is matched whole and
handled in its own try. The listener never dies: a lost connection is made anew with jittered
backoff, and after every (re)connect each watched job is read again, since notifications sent
meanwhile are gone.
"""
from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable

import psycopg

from userexport.backoff import Backoff
from userexport_server.identifiers import JOB_ID
from userexport_server.jobs.events import EventBus, JobChange
from userexport_server.jobs.model import Job, JobStatus
from userexport_server.logs import EventLog, RateLimitedLog

log = EventLog(__name__)
CHANNEL = "userexport_jobs"
# `<origin>:<job id>:<version>:<status>`, as the trigger writes it; anything else is dropped.
PAYLOAD = re.compile(rf"(?P<origin>[0-9a-f]{{12}})?:(?P<job_id>{JOB_ID.strip('^$')}):"
                     rf"(?P<version>[1-9][0-9]{{0,17}}):(?P<status>{'|'.join(s.value for s in JobStatus)})")
MAX_PAYLOAD_CHARS = 80
# Reconnects: quick after a blip, at most this long while the database stays away.
RECONNECT = Backoff(initial=0.2, maximum=5.0)
# How long one wait for notifications lasts; reloads that failed are retried this often.
TICK_SECONDS = 0.5


def connect(dsn: str) -> psycopg.Connection:
    """Bounded connect; TCP keepalives notice a vanished database even when no notification is due."""
    return psycopg.connect(dsn, autocommit=True, connect_timeout=5, keepalives=1, keepalives_idle=10,
                           keepalives_interval=5, keepalives_count=3)


class PgListener:
    """The thread that LISTENs for other replicas' changes and hands them to `bus`; `load` reads a
    job (any tenant) for its watchers here; `on_delivered` is told the updated_at of each job another
    replica's change brought to local watchers (the event-lag metric)."""

    def __init__(self, dsn: str, origin: str, bus: EventBus, load: Callable[[str], Job | None],
                 on_delivered: Callable[[float], None] | None = None) -> None:
        self.dsn, self.origin, self.bus, self.load, self.on_delivered = dsn, origin, bus, load, on_delivered
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._stale: set[str] = set()  # watched jobs whose reload failed; retried every tick
        self._limited_log = RateLimitedLog(log, limit=1)  # hostile payloads must not fill the disk
        self._thread: threading.Thread | None = None
        bus.feed_lost("event listener not started")

    def start(self, ready_timeout: float = 5.0) -> None:
        """Start listening; waits a moment for the first LISTEN so health starts out true."""
        self._thread = threading.Thread(target=self._listen_forever, name="pg-listener", daemon=True)
        self._thread.start()
        if not self._ready.wait(ready_timeout):
            log.warning("pg listener not ready; health says so until it is", waited_seconds=ready_timeout)

    def healthy(self) -> str | None:
        if self._thread is None or not self._thread.is_alive():
            return "event listener thread is not running"
        return self.bus.healthy()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout)

    def _listen_forever(self) -> None:
        """Returns only on stop(): every error is logged and the connection made anew, with backoff."""
        failures = 0
        while not self._stop.is_set():
            try:
                with connect(self.dsn) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    # Notifications sent while no LISTEN was in place are gone: what the cache
                    # holds may be old (it was bypassed meanwhile).
                    if self.bus.healthy() is not None:
                        log.info("pg listener listening", channel=CHANNEL, origin=self.origin)
                    self.bus.feed_restored()
                    self._ready.set()
                    failures = 0
                    self._resync()
                    while not self._stop.is_set():
                        for notification in conn.notifies(timeout=TICK_SECONDS):
                            self._handle(notification.payload)
                        self._retry_stale()
            except psycopg.Error as exc:
                error = " ".join(str(exc).split())  # libpq's messages span lines; a log line must not
                self.bus.feed_lost(f"event listener has no database connection: {error}")
                log.warning("pg listener lost its connection", error=error)
            except Exception as exc:
                self.bus.feed_lost(f"event listener failed: {exc!r}")
                log.exception("pg listener failed")
            failures += 1
            if self._stop.wait(RECONNECT.delay(failures)):
                break
        self.bus.feed_lost("event listener stopped")

    def _handle(self, payload: str) -> None:
        """One notification; whatever goes wrong with it stays with it."""
        try:
            found = PAYLOAD.fullmatch(payload) if len(payload) <= MAX_PAYLOAD_CHARS else None
            if found is None:
                self._limited_log.log(logging.WARNING, "malformed", "pg listener dropped a malformed notification",
                                      channel=CHANNEL, payload=payload[:MAX_PAYLOAD_CHARS], length=len(payload))
                return
            if found["origin"] == self.origin:
                return
            job_id = found["job_id"]
            self.bus.changed_elsewhere(JobChange(job_id, int(found["version"]), JobStatus(found["status"])))
            if self.bus.watcher_count(job_id):
                job = self._reload(job_id)
                if job is not None and self.on_delivered is not None:
                    self.on_delivered(job.updated_at.timestamp())
        except Exception as exc:
            self._limited_log.log(logging.ERROR, "handle", "pg listener could not handle a notification",
                                  payload=payload[:MAX_PAYLOAD_CHARS], exc_info=exc)

    def _resync(self) -> None:
        """After (re)connecting, notifications may have been missed: refresh every watched job, so no
        watcher misses a transition (above all the terminal one) that happened while we were away."""
        for job_id in self.bus.watched():
            self._reload(job_id)

    def _retry_stale(self) -> None:
        watched = set(self.bus.watched())
        self._stale.intersection_update(watched)  # nobody watches the others any more
        for job_id in list(self._stale):
            self._reload(job_id)

    def _reload(self, job_id: str) -> Job | None:
        """Read the job and hand it to its watchers (and return it); if the read fails, it is retried next tick."""
        try:
            job = self.load(job_id)
        except Exception as exc:
            self._stale.add(job_id)
            self._limited_log.log(logging.WARNING, "reload", "reloading a job for its watchers failed", job_id=job_id,
                                  error=exc, retry_in_seconds=TICK_SECONDS)
            return None
        self._stale.discard(job_id)
        if job is not None:
            self.bus.deliver(job)
        return job
