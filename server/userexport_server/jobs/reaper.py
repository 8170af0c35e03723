"""The reaper: times out stuck exports, expires jobs after their lifetime, deletes files, purges."""
from __future__ import annotations

import logging
import threading

from userexport_server.jobs.store import JobStore
from userexport_server.storage.base import Storage

log = logging.getLogger(__name__)


class Reaper:
    def __init__(self, store: JobStore, storage: Storage, interval: float) -> None:
        self.store, self.storage, self.interval = store, storage, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="reaper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def run_once(self) -> None:
        self.store.fail_timed_out()
        for job in self.store.expire_due():
            if job.storage_key:
                self.storage.delete(job.storage_key)
        self.store.purge_expired()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.run_once()
            except Exception:  # a database hiccup must not kill the reaper; the next round retries
                log.exception("reaper round failed")
