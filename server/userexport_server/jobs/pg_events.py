"""Job events across replicas: PostgreSQL LISTEN/NOTIFY carries "job changed" to every replica.

A change is delivered to local watchers at once and announced with NOTIFY; each other replica's
listener thread reads the job once (only if it has watchers for it) and fans it out locally. Payloads
carry only ids, so no size limit applies, and the origin, so a replica ignores its own echoes.
"""
from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable

import psycopg

from userexport_server.jobs.events import EventBus
from userexport_server.jobs.model import Job

log = logging.getLogger(__name__)
CHANNEL = "userexport_jobs"


class PgEventBus(EventBus):
    def __init__(self, dsn: str, load: Callable[[str], Job | None],
                 on_created: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.dsn, self.load, self.on_created = dsn, load, on_created
        self.origin = uuid.uuid4().hex[:12]
        self._publisher: psycopg.Connection | None = None
        self._publish_lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._listen_forever, name="pg-listener", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            log.warning("pg listener not ready after 10 s; watchers on other replicas' jobs may lag")

    def publish(self, job: Job) -> None:
        self.deliver(job)
        payload = f"{self.origin}:{job.id}:{job.version}"
        with self._publish_lock:
            for attempt in (1, 2):
                try:
                    if self._publisher is None or self._publisher.closed:
                        self._publisher = psycopg.connect(self.dsn, autocommit=True)
                    self._publisher.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))
                    return
                except psycopg.OperationalError as exc:
                    self._publisher = None
                    if attempt == 2:
                        log.error("notify failed job_id=%s version=%d error=%s", job.id, job.version, exc)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        with self._publish_lock:
            if self._publisher is not None:
                self._publisher.close()

    def _listen_forever(self) -> None:
        delay = 0.5
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.dsn, autocommit=True) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self._ready.set()
                    self._resync()
                    delay = 0.5
                    while not self._stop.is_set():
                        for notification in conn.notifies(timeout=0.5):
                            self._handle(notification.payload)
            except psycopg.Error as exc:
                log.warning("pg listener lost its connection error=%s retry_in=%.1fs", exc, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 10.0)

    def _handle(self, payload: str) -> None:
        origin, job_id, version = payload.split(":")
        if origin == self.origin:
            return
        if version == "1" and self.on_created is not None:
            self.on_created()
        if self.watcher_count(job_id):
            self._reload(job_id)

    def _resync(self) -> None:
        """After (re)connecting, notifications may have been missed: refresh every watched job."""
        with self._lock:
            watched = list(self._subscriptions)
        for job_id in watched:
            self._reload(job_id)

    def _reload(self, job_id: str) -> None:
        try:
            job = self.load(job_id)
        except Exception:
            log.exception("reloading a job for its watchers failed job_id=%s", job_id)
            return
        if job is not None:
            self.deliver(job)
