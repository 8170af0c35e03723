"""Job events across replicas: PostgreSQL LISTEN/NOTIFY carries "job changed" to every replica.

A change is delivered to local watchers at once and announced with NOTIFY; each other replica's
listener thread drops older versions of the job from its cache, and reads the job once (only if it
has watchers for it) and fans it out locally. Payloads
carry only ids, so no size limit applies, and the origin, so a replica ignores its own echoes.

Any database role may NOTIFY on the channel, so payloads are untrusted: each is matched whole and
handled in its own try. The listener never dies: a lost connection is made anew with backoff, and
after every (re)connect each watched job is read again, since notifications sent meanwhile are gone.
"""
from __future__ import annotations

import logging
import re
import threading
import uuid
from collections.abc import Callable

import psycopg

from userexport_server.identifiers import JOB_ID
from userexport_server.jobs.events import EventBus
from userexport_server.jobs.model import Job
from userexport_server.logs import RateLimitedLog

log = logging.getLogger(__name__)
CHANNEL = "userexport_jobs"
# `<origin>:<job id>:<version>`, as publish() writes it; anything else is dropped.
PAYLOAD = re.compile(rf"(?P<origin>[0-9a-f]{{12}}):(?P<job_id>{JOB_ID.strip('^$')}):(?P<version>[1-9][0-9]{{0,17}})")
MAX_PAYLOAD_CHARS = 64
# Reconnect backoff: quick after a blip, at most this long while the database stays away.
RETRY_FIRST_SECONDS, RETRY_MAX_SECONDS = 0.2, 5.0
# How long one wait for notifications lasts; reloads that failed are retried this often.
TICK_SECONDS = 0.5


class PgEventBus(EventBus):
    def __init__(self, dsn: str, load: Callable[[str], Job | None],
                 on_created: Callable[[], None] | None = None,
                 on_delivered: Callable[[Job], None] | None = None) -> None:
        """`on_created` is told of jobs created on other replicas; `on_delivered` of each job another
        replica's notification brought to local watchers (for the event-lag metric)."""
        super().__init__()
        self.dsn, self.load, self.on_created, self.on_delivered = dsn, load, on_created, on_delivered
        self.origin = uuid.uuid4().hex[:12]
        self._publisher: psycopg.Connection | None = None
        self._publish_lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._problem: str | None = "event listener not started"
        self._stale: set[str] = set()  # watched jobs whose reload failed; retried every tick
        self._limited_log = RateLimitedLog(log, limit=1)  # hostile payloads must not fill the disk
        self._thread = threading.Thread(target=self._listen_forever, name="pg-listener", daemon=True)

    def start(self, ready_timeout: float = 5.0) -> None:
        """Start listening; waits a moment for the first LISTEN so health starts out true."""
        self._thread.start()
        if not self._ready.wait(ready_timeout):
            log.warning("pg listener not ready after %.0f s; health says so until it is", ready_timeout)

    def healthy(self) -> str | None:
        if not self._thread.is_alive():
            return "event listener thread is not running"
        return self._problem

    def publish(self, job: Job) -> None:
        self.deliver(job)
        payload = f"{self.origin}:{job.id}:{job.version}"
        with self._publish_lock:
            for attempt in (1, 2):
                try:
                    if self._publisher is None or self._publisher.closed:
                        self._publisher = self._connect()
                    self._publisher.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))
                    return
                except psycopg.OperationalError as exc:
                    self._publisher = None
                    if attempt == 2:
                        log.error("notify failed job_id=%s version=%d error=%s", job.id, job.version, exc)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        with self._publish_lock:
            if self._publisher is not None:
                self._publisher.close()

    def _connect(self) -> psycopg.Connection:
        """Bounded connect; TCP keepalives notice a vanished database even when no notification is due."""
        return psycopg.connect(self.dsn, autocommit=True, connect_timeout=5, keepalives=1, keepalives_idle=10,
                               keepalives_interval=5, keepalives_count=3)

    def _listen_forever(self) -> None:
        """Returns only on close(): every error is logged and the connection made anew, with backoff."""
        delay = RETRY_FIRST_SECONDS
        while not self._stop.is_set():
            try:
                with self._connect() as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    # Notifications sent while no LISTEN was in place are gone: what the cache
                    # holds may be old (it was bypassed meanwhile, as health was not None).
                    self.cache.clear()
                    if self._problem is not None:
                        log.info("pg listener listening channel=%s origin=%s", CHANNEL, self.origin)
                    self._problem = None
                    self._ready.set()
                    delay = RETRY_FIRST_SECONDS
                    self._resync()
                    while not self._stop.is_set():
                        for notification in conn.notifies(timeout=TICK_SECONDS):
                            self._handle(notification.payload)
                        self._retry_stale()
            except psycopg.Error as exc:
                error = " ".join(str(exc).split())  # libpq's messages span lines; a log line must not
                self._problem = f"event listener has no database connection: {error}"
                log.warning("pg listener lost its connection error=%s retry_in=%.1fs", error, delay)
            except Exception as exc:
                self._problem = f"event listener failed: {exc!r}"
                log.exception("pg listener failed retry_in=%.1fs", delay)
            if self._stop.wait(delay):
                break
            delay = min(delay * 2, RETRY_MAX_SECONDS)
        self._problem = "event listener stopped"

    def _handle(self, payload: str) -> None:
        """One notification; whatever goes wrong with it stays with it."""
        try:
            found = PAYLOAD.fullmatch(payload) if len(payload) <= MAX_PAYLOAD_CHARS else None
            if found is None:
                self._limited_log.log(logging.WARNING, "malformed", "pg listener dropped a malformed notification "
                                      "channel=%s payload=%r length=%d", CHANNEL, payload[:MAX_PAYLOAD_CHARS],
                                      len(payload))
                return
            if found["origin"] == self.origin:
                return
            self.cache.outdate(found["job_id"], int(found["version"]))
            if found["version"] == "1" and self.on_created is not None:
                self.on_created()
            if self.watcher_count(found["job_id"]):
                job = self._reload(found["job_id"])
                if job is not None and self.on_delivered is not None:
                    self.on_delivered(job)
        except Exception as exc:
            self._limited_log.log(logging.ERROR, "handle", "pg listener could not handle a notification payload=%r",
                                  payload[:MAX_PAYLOAD_CHARS], exc_info=exc)

    def _resync(self) -> None:
        """After (re)connecting, notifications may have been missed: refresh every watched job, so no
        watcher misses a transition (above all the terminal one) that happened while we were away."""
        with self._lock:
            watched = list(self._subscriptions)
        for job_id in watched:
            self._reload(job_id)

    def _retry_stale(self) -> None:
        with self._lock:
            self._stale.intersection_update(self._subscriptions)  # nobody watches the others any more
            stale = list(self._stale)
        for job_id in stale:
            self._reload(job_id)

    def _reload(self, job_id: str) -> Job | None:
        """Read the job and hand it to its watchers (and return it); if the read fails, it is retried next tick."""
        try:
            job = self.load(job_id)
        except Exception as exc:
            with self._lock:
                self._stale.add(job_id)
            self._limited_log.log(logging.WARNING, "reload", "reloading a job for its watchers failed job_id=%s "
                                  "error=%r retry_in=%.1fs", job_id, exc, TICK_SECONDS)
            return None
        with self._lock:
            self._stale.discard(job_id)
        if job is not None:
            self.deliver(job)
        return job
