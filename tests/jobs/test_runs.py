"""Runs renew their lease only while they move; a stalled one is cancelled and reported by health."""
from __future__ import annotations

import logging
import threading
import time

import pytest

from tests.polling import eventually
from userexport_server.db.faults import DatabaseUnavailable
from userexport_server.jobs.runs import Runs


def test_a_moving_run_is_renewed_and_a_stalled_one_cancelled_and_reported() -> None:
    """While the run moves, every beat renews; once it stops moving for stall_seconds its lease is
    no longer renewed, its canceller runs, and health names it until the run ends."""
    runs = Runs(lease_seconds=0.3, stall_seconds=0.5)
    renewals: list[float] = []
    cancelled = threading.Event()

    def renew() -> bool:
        renewals.append(time.monotonic())
        return True

    with runs.running("job_A", "slice 0", renew) as run, run.cancellable(cancelled.set):
        deadline = time.monotonic() + 0.6
        while time.monotonic() < deadline:
            run.moved()
            time.sleep(0.02)
        assert len(renewals) >= 4, "a moving run's lease was not renewed"
        assert cancelled.wait(2), "the stalled run's canceller never ran"
        assert run.stop.is_set() and run.reasons == ["stalled"]
        problem = runs.problem()
        assert problem is not None and "job job_A slice 0" in problem
        stalled_at = len(renewals)
        time.sleep(0.3)
        assert len(renewals) == stalled_at, "a stalled run's lease kept being renewed"
    assert runs.problem() is None


def test_a_lost_lease_cancels_and_a_database_fault_only_skips_a_beat(caplog: pytest.LogCaptureFixture) -> None:
    """Renewals failing while the database is away are logged once a minute, without a traceback
    (they used to log a full traceback at every beat); a lost lease cancels the run."""
    caplog.set_level(logging.WARNING, logger="userexport_server.jobs.runs")
    runs = Runs(lease_seconds=0.15, stall_seconds=60)
    answers: list[bool | Exception] = [*[DatabaseUnavailable("down")] * 5, True, False]
    cancelled = threading.Event()

    def renew() -> bool:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    with runs.running("job_B", "plan", renew) as run, run.cancellable(cancelled.set):
        while not run.stop.is_set():
            run.moved()
            time.sleep(0.01)
        assert cancelled.is_set() and run.reasons == ["lease lost"]
    failures = [r for r in caplog.records if r.getMessage().startswith("lease renewal failed")]
    assert len(failures) == 1 and failures[0].exc_info is None, [r.getMessage() for r in caplog.records]


def test_a_canceller_runs_only_while_registered() -> None:
    """A canceller stops what the run is blocked in (a socket); once the run left that block the
    socket may be someone else's, so a later cancel must not touch it."""
    runs = Runs(lease_seconds=60, stall_seconds=60)
    calls: list[str] = []
    with runs.running("job_C", "slice 1", lambda: True) as run:
        with run.cancellable(lambda: calls.append("inside")):
            pass
        runs.stop("cancelled", "job_C", cancel=True)
        eventually(run.stop.is_set, "the run stopping")
    assert calls == []
