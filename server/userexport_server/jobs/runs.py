"""Runs: the work held here (a plan, a slice, an assembly), each with a heartbeat that renews its
lease only while the work moves.

A lease renewed by a timer alone would let a stuck database read (a hung or SIGSTOPped backend, a
lock that is never released) hold its slice for ever, with no other replica allowed to rescue it.
So the heartbeat asks first whether the run has moved (rows read, bytes written, a phase's step
done) within `stall_seconds`. A run that has not is stalled: its lease is no longer renewed, and
it is cancelled in place (its query stopped, see db/engine.py `canceller`), so that its worker
hands the work back at once, or, if even that cannot be done, the lease lapses and another claim
takes it. Shutdown and cancels stop runs the same way.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator

from userexport_server.db.faults import DatabaseUnavailable
from userexport_server.logs import EventLog, RateLimitedLog

log = EventLog(__name__)
# A failed renewal is expected while the database is away: a line per run and minute is enough.
_limited_log = RateLimitedLog(log, limit=1)


class Run:
    """One piece of work running here, so that cancels, shutdown and stalls can reach it."""

    def __init__(self, job_id: str, work: str) -> None:
        self.job_id, self.work = job_id, work
        self.stop = threading.Event()
        self.reasons: list[str] = []
        self.moved_at = time.monotonic()
        self._cancellers: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    def moved(self) -> None:
        """The work made progress: its lease may be renewed."""
        self.moved_at = time.monotonic()

    def idle_seconds(self) -> float:
        return time.monotonic() - self.moved_at

    def signal(self, reason: str) -> None:
        """Ask the work to stop at its next step."""
        self.reasons.append(reason)
        self.stop.set()

    def cancel(self, reason: str) -> None:
        """Stop the work now: signal it and cancel what it is blocked in (its query)."""
        self.signal(reason)
        with self._lock:
            for cancel in self._cancellers:
                try:
                    cancel()
                except Exception:
                    log.exception("cancelling work failed", job_id=self.job_id, work=self.work)

    @contextlib.contextmanager
    def cancellable(self, cancel: Callable[[], None]) -> Iterator[None]:
        """While inside, cancel() calls `cancel`; never after, since what it stops (a socket) may be
        someone else's by then. A run already stopping is cancelled on entry."""
        with self._lock:
            self._cancellers.append(cancel)
        try:
            if self.stop.is_set():
                cancel()
            yield
        finally:
            with self._lock:
                self._cancellers.remove(cancel)

    def describe(self) -> str:
        return f"job {self.job_id} {self.work}"


class Runs:
    """The runs of this process, with their heartbeats: every `lease_seconds / 3` a moving run's
    lease is renewed; one idle for `stall_seconds` is cancelled (reason "stalled")."""

    def __init__(self, *, lease_seconds: float, stall_seconds: float) -> None:
        self.interval, self.stall_seconds = lease_seconds / 3, stall_seconds
        self._runs: set[Run] = set()
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def running(self, job_id: str, work: str, renew: Callable[[], bool]) -> Iterator[Run]:
        """Register a run, with a heartbeat that calls `renew` (False: the lease is lost, and the run
        is cancelled) while the run moves; on leaving, the heartbeat stops (within a bounded wait)."""
        run = Run(job_id, work)
        with self._lock:
            self._runs.add(run)
        heartbeat = threading.Thread(target=self._heartbeat, args=(run, renew), daemon=True,
                                     name=f"heartbeat-{job_id}")
        heartbeat.start()
        try:
            yield run
        finally:
            with self._lock:
                self._runs.discard(run)
            run.signal("done")
            heartbeat.join(5.0)  # a renewal stuck in the database must not hold the worker

    def stop(self, reason: str, job_id: str | None = None, *, cancel: bool = False) -> int:
        """Signal (or cancel) the runs of `job_id`, or all; returns how many."""
        with self._lock:
            runs = [run for run in self._runs if job_id is None or run.job_id == job_id]
        for run in runs:
            if cancel:
                run.cancel(reason)
            else:
                run.signal(reason)
        return len(runs)

    def job_ids(self) -> list[str]:
        with self._lock:
            return sorted({run.job_id for run in self._runs})

    def problem(self) -> str | None:
        """Why work here is stuck (for health), or None: runs that stalled and have not ended yet."""
        with self._lock:
            stuck = [run for run in self._runs if "stalled" in run.reasons]
        if not stuck:
            return None
        return f"{len(stuck)} export run(s) stalled for over {self.stall_seconds:g} s: " + \
            ", ".join(run.describe() for run in stuck[:3])

    def _heartbeat(self, run: Run, renew: Callable[[], bool]) -> None:
        while not run.stop.wait(self.interval):
            idle = run.idle_seconds()
            if idle > self.stall_seconds:
                log.warning("work stalled, cancelled and handed back", job_id=run.job_id, work=run.work,
                            idle_seconds=round(idle, 1))
                run.cancel("stalled")
                return
            try:
                held = renew()
            except DatabaseUnavailable as error:  # the next beat retries, well within the lease
                _limited_log.log(logging.WARNING, "renew", "lease renewal failed", job_id=run.job_id, work=run.work,
                                 error=error)
                continue
            except Exception as error:
                _limited_log.log(logging.ERROR, "renew-error", "lease renewal failed", job_id=run.job_id, work=run.work,
                                 exc_info=error)
                continue
            if not held:
                log.info("lease lost, work cancelled", job_id=run.job_id, work=run.work)
                run.cancel("lease lost")
                return
