"""HealthMonitor on its own: a check that raises is a reason to be NOT_SERVING, not the end of the
monitor. (Health of a real server: tests/integration/test_health.py.)"""
from __future__ import annotations

import asyncio
import threading

from grpc_health.v1 import health, health_pb2

from userexport_server.app import SERVICE_NAME
from userexport_server.health import HealthMonitor

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def test_a_check_that_raises_counts_as_down_and_the_monitor_goes_on() -> None:
    """A check's own exception is a reason (NOT_SERVING), not the end of the monitor: when the
    check works again, the status returns to SERVING."""
    failures = iter([RuntimeError("probe broke"), RuntimeError("probe broke")])

    def flaky() -> str | None:
        error = next(failures, None)
        if error is not None:
            raise error
        return None

    async def scenario() -> list[int]:
        servicer = health.aio.HealthServicer()
        monitor = HealthMonitor(servicer, ("", SERVICE_NAME), {"flaky": flaky}, interval=0.05)
        request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        await monitor.start()
        seen = [(await servicer.Check(request, None)).status]
        for _ in range(100):
            await asyncio.sleep(0.05)
            seen.append((await servicer.Check(request, None)).status)
            if seen[-1] == SERVING:
                break
        await monitor.stop()
        return seen

    seen = asyncio.run(scenario())
    assert seen[0] == NOT_SERVING and seen[-1] == SERVING, seen


def test_stop_ends_the_monitor_even_when_it_lands_as_a_round_ends() -> None:
    """A cancel that arrives just as a round's answer does must still end the monitor: Python 3.11's
    wait_for returned the answer and dropped the cancel, the monitor went on, and the server's stop
    waited for ever (seen after a PostgreSQL restart). The round's check is held until the test lets
    it go, and the stop lands 0-5 loop steps after the answer is in, the window included."""

    async def stops_after(steps: int) -> bool:
        release, entered = threading.Event(), threading.Event()
        rounds = 0

        def held() -> str | None:
            nonlocal rounds
            rounds += 1
            if rounds > 1:  # start()'s own round answers at once
                entered.set()
                release.wait(5)
            return None

        monitor = HealthMonitor(health.aio.HealthServicer(), ("",), {"held": held}, interval=0)
        await monitor.start()
        await asyncio.to_thread(entered.wait, 5)
        release.set()
        # Polled a loop step at a time (not awaited), so the steps below count from the answer.
        while monitor._running is None or not monitor._running.done():  # noqa: ASYNC110
            await asyncio.sleep(0)
        for _ in range(steps):
            await asyncio.sleep(0)
        stopping = asyncio.create_task(monitor.stop())
        done, _ = await asyncio.wait({stopping}, timeout=2)
        while not stopping.done():  # the test's own clean-up of a monitor that outlived its stop
            for task in asyncio.all_tasks():
                if task.get_name() == "health-monitor":
                    task.cancel()
            await asyncio.sleep(0.01)
        return bool(done)

    async def scenario() -> list[int]:
        return [steps for steps in range(6) if not await stops_after(steps)]

    assert asyncio.run(scenario()) == []
