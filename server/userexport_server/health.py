"""The health monitor: turns what is really alive into grpc.health.v1 statuses.

Orchestrators (and the Dockerfile HEALTHCHECK through `userexport-server health`) only learn of a
dead worker pool, an unreachable database or a dead event listener from health, so every few
moments each part is asked, and the status of the whole server and of each service follows.
An advisory check (the export standby: exports fall back to the primary without it) has a health
service of its own and never turns the server NOT_SERVING: restarting replicas would not mend it.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

from grpc_health.v1 import health, health_pb2
from sqlalchemy import Engine, text

from userexport_server.logs import EventLog

log = EventLog(__name__)
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
# A check that takes longer than this counts as failed (a database that hangs is as bad as a dead one).
CHECK_TIMEOUT_SECONDS = 3.0
# The name a round that got no answer in time fails under (which check hangs is not known).
STUCK = "checks"

Check = Callable[[], str | None]


def database_problem(engine: Engine) -> str | None:
    """Why the database cannot be used, or None: a cheap round trip through the engine's pool."""
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as exc:
        first_line = next(iter(str(exc).splitlines()), "")
        return f"unreachable: {type(exc).__name__}: {first_line}"
    return None


class HealthMonitor:
    """Every `interval` seconds runs `checks` (name -> reason it is down, or None) off the loop and
    sets `services` SERVING when none reports a reason, NOT_SERVING otherwise; each `advisory` check
    (name -> (its own service, check)) sets its service alone."""

    def __init__(self, servicer: health.aio.HealthServicer, services: Sequence[str], checks: Mapping[str, Check],
                 interval: float, advisory: Mapping[str, tuple[str, Check]] | None = None) -> None:
        self.servicer, self.services, self.checks, self.interval = servicer, tuple(services), dict(checks), interval
        self.advisory = dict(advisory or {})
        self._advisory_status: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._running: asyncio.Future[list[str]] | None = None
        self._status: int | None = None
        self._failing: frozenset[str] = frozenset()
        self._last_error = ""

    async def start(self) -> None:
        """Checks once before returning, so the first answer is already the truth; then keeps checking."""
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="health")
        await self._check_once()
        self._task = asyncio.create_task(self._run(), name="health-monitor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task})  # its end, without taking a cancel of our caller's as its own
            self._task = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def check_results(self) -> dict[str, bool]:
        """Each check's verdict in the latest round, for metrics; all False while a round hangs."""
        stuck = STUCK in self._failing
        return {**{name: not stuck and name not in self._failing for name in self.checks},
                **{name: not stuck and self._advisory_status.get(name) == SERVING for name in self.advisory}}

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self._check_once()

    async def _check_once(self) -> None:
        """One round; the monitor's own errors are logged (once per distinct error) and never end it."""
        try:
            reasons = await self._reasons()
            await self._apply([r for r in reasons if r.split(":", 1)[0] not in self.advisory])
            await self._apply_advisory(reasons)
            self._last_error = ""
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if repr(exc) != self._last_error:
                log.exception("health check round failed", error=exc)
            self._last_error = repr(exc)

    async def _reasons(self) -> list[str]:
        """Reasons the server is down; a round still stuck in a check from before counts as one."""
        assert self._executor is not None
        if self._running is None or self._running.done():
            self._running = asyncio.get_running_loop().run_in_executor(self._executor, self._ask_all)
        # asyncio.timeout, not wait_for: Python 3.11's wait_for returns an answer that arrives with a
        # cancel and drops the cancel, so the monitor outlived stop() and the server's stop hung.
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_SECONDS):
                return await asyncio.shield(self._running)
        except TimeoutError:
            return [f"{STUCK}: no answer within {CHECK_TIMEOUT_SECONDS:.0f} s (database or listener hanging)"]

    def _ask_all(self) -> list[str]:
        reasons = []
        for name, check in [*self.checks.items(), *((name, check) for name, (_, check) in self.advisory.items())]:
            try:
                reason = check()
            except Exception as exc:
                reason = f"check failed: {exc!r}"
            if reason is not None:
                reasons.append(f"{name}: {reason}")
        return reasons

    async def _apply(self, reasons: list[str]) -> None:
        status = NOT_SERVING if reasons else SERVING
        failing = frozenset(reason.split(":", 1)[0] for reason in reasons)
        if status != self._status or failing != self._failing:
            name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
            log.log(logging.WARNING if reasons else logging.INFO, "health changed", status=name,
                    reasons="; ".join(reasons) or "none")
            for service in self.services:
                await self.servicer.set(service, status)
            self._status, self._failing = status, failing

    async def _apply_advisory(self, reasons: list[str]) -> None:
        """Each advisory check's service follows that check alone (a stuck round leaves them as they were)."""
        if any(reason.startswith(f"{STUCK}:") for reason in reasons):
            return
        for name, (service, _) in self.advisory.items():
            reason = next((r.split(": ", 1)[1] for r in reasons if r.split(":", 1)[0] == name), None)
            status = NOT_SERVING if reason else SERVING
            if self._advisory_status.get(name) != status:
                log.log(logging.WARNING if reason else logging.INFO, "health changed", service=service,
                        status=health_pb2.HealthCheckResponse.ServingStatus.Name(status), reasons=reason or "none")
                await self.servicer.set(service, status)
                self._advisory_status[name] = status
