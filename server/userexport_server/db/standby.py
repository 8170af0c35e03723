"""Where an export's users-table reads run: on a hot standby (USEREXPORT_EXPORT_DATABASE_URL, a
PostgreSQL streaming replica of the primary) when one is configured and has caught up, else on the
primary. The primary serves the identity system's logins; with a standby an export costs it only
the job's bookkeeping. Jobs, slices, leases and events stay on the primary.

Replay lag is never ignored. A read runs on the standby only once the standby shows the job's row
(planning) or the slice's row (a slice, so the plan too): it has then replayed everything that
was committed before the job was created, so no export is older than its job. The wait is bounded
(USEREXPORT_EXPORT_DATABASE_WAIT_SECONDS). A standby that cannot be used (unreachable, promoted, a
replica of something else, known to be further behind than that bound) or that is still behind
after the wait is passed over, and the read runs on the primary, logged and counted: the file is
correct either way, and without a standby every read ran there anyway. A failed job would need a
person to notice and retry it; load on the primary goes away by itself once the standby is back.

A watch thread probes the standby once per health interval (its state, how far behind it is, in
bytes of WAL and in seconds) for health and metrics and for the choice above; a probe that hangs
leaves the state stale, which counts as unreachable, so nothing else waits on it.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, cast

from sqlalchemy import Connection, Engine, Table, select, text

from userexport_server.db.engine import canceller
from userexport_server.db.faults import brief, translated
from userexport_server.db.models import Job as JobRow
from userexport_server.db.models import JobSlice as SliceRow
from userexport_server.errors import WorkStopped
from userexport_server.logs import EventLog, RateLimitedLog

log = EventLog(__name__)
_limited_log = RateLimitedLog(log, limit=1)
JOBS, SLICES = cast(Table, JobRow.__table__), cast(Table, SliceRow.__table__)
PRIMARY, STANDBY = "primary", "standby"
# Why a read fell back to the primary (the metric's label): the standby could not be used, or had
# not replayed the job's creation in time.
UNAVAILABLE, BEHIND = "unavailable", "behind"
# A probe older than this many intervals means the standby hangs (or the watch does).
STALE_INTERVALS = 3
# The wait for the job's row polls this often at first, then backs off to the maximum.
POLL_FIRST, POLL_MAX = 0.01, 0.2
# Primary WAL positions kept for the lag in seconds (one a probe: ten minutes at one a second).
LSN_SAMPLES = 600


class Cancellable(Protocol):
    """What a read needs of its run (jobs/runs.py Run): its job, its stop event, and a way to be
    cancelled while it waits on the standby."""

    job_id: str
    stop: threading.Event

    def cancellable(self, cancel: Callable[[], None]) -> contextlib.AbstractContextManager[None]: ...


@dataclass(frozen=True, slots=True)
class StandbyState:
    """The latest probe. `problem`: why reads pass the standby over (None: usable); `lag_bytes`:
    WAL the primary wrote that the standby has not replayed; `lag_seconds`: how long ago the primary
    wrote the oldest of it (to within one probe interval; 0 when caught up); None: unknown."""

    problem: str | None
    lag_bytes: int | None = None
    lag_seconds: float | None = None
    paused: bool = False
    at: float = 0.0


class Standby:
    """The hot standby, watched: `state()` is the latest probe, made in a thread of its own every
    `interval` seconds between start() and stop()."""

    def __init__(self, engine: Engine, primary: Engine, *, interval: float, wait_seconds: float) -> None:
        self.engine, self.primary, self.interval, self.wait_seconds = engine, primary, interval, wait_seconds
        self._state: StandbyState | None = None
        self._identity: tuple[str, str] | None = None  # the primary's (system identifier, database)
        self._samples: collections.deque[tuple[float, int]] = collections.deque(maxlen=LSN_SAMPLES)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Probe once (so health's first answer is the truth), then keep probing in a thread."""
        self._state = self.probe()
        self._stopping.clear()
        self._thread = threading.Thread(target=self._watch, name="standby-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(5.0)  # a probe stuck on a hung standby must not hold shutdown
            self._thread = None
        self.engine.dispose()

    def state(self) -> StandbyState:
        """The latest probe, or why there is none that can be trusted."""
        state = self._state
        if state is None:
            return StandbyState("not probed yet")
        age = time.monotonic() - state.at
        if age > max(STALE_INTERVALS * self.interval, 3.0):
            return StandbyState(f"unreachable: no answer for {age:.0f} s", at=state.at)
        return state

    def lag(self) -> tuple[float | None, float | None]:
        """(bytes, seconds) behind the primary, for metrics; None: unknown."""
        state = self.state()
        return state.lag_bytes, state.lag_seconds

    def passed_over(self) -> tuple[str, str] | None:
        """(reason label, why) when a read should not even try the standby now, else None."""
        if self._state is None:  # the first probe runs as the server starts: try meanwhile
            return None
        state = self.state()
        if state.problem is not None:
            return UNAVAILABLE, state.problem
        if state.lag_seconds is not None and state.lag_seconds > self.wait_seconds:
            return BEHIND, f"is {state.lag_seconds:.0f} s behind the primary"
        return None

    def health(self) -> str | None:
        """Why the standby is not fit to serve exports (for health), or None."""
        state = self.state()
        if state.problem is not None:
            return state.problem
        if state.paused:
            return "replay is paused (pg_wal_replay_pause)"
        passed = self.passed_over()
        return None if passed is None else passed[1]

    def _watch(self) -> None:
        while not self._stopping.wait(self.interval):
            try:
                self._state = self.probe()
            except Exception:  # a bug in the probe: logged, the state goes stale, the thread lives
                log.exception("standby probe failed")

    def probe(self) -> StandbyState:
        """Ask the standby (and the primary, for the lag) where they are."""
        primary_lsn = self._primary_position()
        try:
            with self.engine.connect() as conn:
                row = conn.execute(text(
                    "SELECT pg_is_in_recovery() AS recovering, pg_last_wal_replay_lsn()::text AS replayed, "
                    "CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() END AS paused, "
                    "(SELECT system_identifier::text FROM pg_control_system()) AS system, "
                    "current_database() AS database")).one()
        except Exception as error:
            return StandbyState(f"unreachable: {brief(error)}", at=time.monotonic())
        now = time.monotonic()
        problem = self._not_a_standby(row)
        if problem is not None or row.replayed is None:
            return StandbyState(problem or "has replayed nothing yet", at=now)
        replayed = lsn(row.replayed)
        lag_bytes = None if primary_lsn is None else max(0, primary_lsn - replayed)
        return StandbyState(None, lag_bytes, self._lag_seconds(replayed, now) if lag_bytes is not None else None,
                            bool(row.paused), now)

    def _primary_position(self) -> int | None:
        """The primary's WAL position now (kept as a sample for the lag in seconds); None when it
        does not answer (health's database check says so)."""
        try:
            with self.primary.connect() as conn:
                row = conn.execute(text("SELECT pg_current_wal_lsn()::text AS position, "
                                        "(SELECT system_identifier::text FROM pg_control_system()) AS system, "
                                        "current_database() AS database")).one()
        except Exception:
            return None
        self._identity = (row.system, row.database)
        position = lsn(row.position)
        self._samples.append((time.monotonic(), position))
        return position

    def _not_a_standby(self, row: Any) -> str | None:
        if not row.recovering:
            return "is not in recovery: not a standby (promoted?)"
        if self._identity is not None and row.system != self._identity[0]:
            return "is not a replica of USEREXPORT_DATABASE_URL (another cluster)"
        if self._identity is not None and row.database != self._identity[1]:
            return f"names database {row.database!r}, the primary's is {self._identity[1]!r}"
        return None

    def _lag_seconds(self, replayed: int, now: float) -> float:
        """Since the earliest probe that found the primary past what the standby has replayed."""
        behind = next((at for at, position in self._samples if position > replayed), None)
        return 0.0 if behind is None else round(now - behind, 3)


class ExportReads:
    """Hands out the connection an export's users-table reads run on (`connect`). `on_read(database,
    fallback)` is told of each: the database it runs on, and why it fell back to the primary
    (UNAVAILABLE, BEHIND) or None."""

    def __init__(self, primary: Engine, standby: Standby | None = None,
                 on_read: Callable[[str, str | None], None] = lambda database, fallback: None) -> None:
        self.primary, self.standby, self.on_read = primary, standby, on_read

    @contextlib.contextmanager
    def connect(self, run: Cancellable, slice_seq: int | None = None) -> Iterator[Connection]:
        """A connection for one planning (`slice_seq` None) or one slice of `run`'s job: the
        standby's once it shows the job's (or the slice's) row, else the primary's. A transient
        fault in the block is DatabaseUnavailable; a stop while waiting is WorkStopped."""
        with translated(), contextlib.ExitStack() as stack:
            conn, fallback = self._on_standby(stack, run, slice_seq) if self.standby is not None else (None, None)
            if conn is None:
                conn = stack.enter_context(self.primary.connect())
            self.on_read(PRIMARY if fallback or self.standby is None else STANDBY, fallback)
            yield conn

    def _on_standby(self, stack: contextlib.ExitStack, run: Cancellable,
                    slice_seq: int | None) -> tuple[Connection | None, str | None]:
        """The standby's connection, entered into `stack`; or None and why the read falls back (logged)."""
        assert self.standby is not None
        passed = self.standby.passed_over()
        if passed is None:
            with contextlib.ExitStack() as attempt:
                try:
                    conn = attempt.enter_context(self.standby.engine.connect())
                    with run.cancellable(canceller(conn)):
                        caught_up = self._replayed(conn, run, _marker(run.job_id, slice_seq))
                except WorkStopped:
                    raise
                except Exception as error:
                    if run.stop.is_set():
                        raise
                    passed = UNAVAILABLE, f"unreachable: {brief(error)}"
                else:
                    if caught_up:
                        stack.enter_context(attempt.pop_all())
                        return conn, None
                    passed = BEHIND, f"has not replayed the job's creation within {self.standby.wait_seconds:g} s"
        reason, why = passed
        _limited_log.log(logging.WARNING, reason, "export reads the primary", job_id=run.job_id,
                         work="plan" if slice_seq is None else f"slice {slice_seq}", standby=why)
        return None, reason

    def _replayed(self, conn: Connection, run: Cancellable, marker: Any) -> bool:
        """Poll the standby for `marker` until it is there (True) or the wait runs out (False)."""
        assert self.standby is not None
        deadline = time.monotonic() + self.standby.wait_seconds
        pause = POLL_FIRST
        while conn.execute(marker).first() is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if run.stop.wait(min(pause, left)):
                raise WorkStopped("stopped while waiting for the standby")
            pause = min(pause * 2, POLL_MAX)
        return True

def _marker(job_id: str, slice_seq: int | None) -> Any:
    """The row whose presence on the standby shows it has replayed far enough for this read."""
    if slice_seq is None:
        return select(JOBS.c.id).where(JOBS.c.id == job_id)
    return select(SLICES.c.seq).where(SLICES.c.job_id == job_id, SLICES.c.seq == slice_seq)


def lsn(text_lsn: str) -> int:
    """A PostgreSQL WAL position ('16/B374D848') as a number of bytes."""
    high, low = text_lsn.split("/")
    return (int(high, 16) << 32) + int(low, 16)
