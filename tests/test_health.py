"""HealthMonitor on its own: a check that raises is a reason to be NOT_SERVING, not the end of the
monitor. (Health of a real server: tests/integration/test_health.py.)"""
from __future__ import annotations

import asyncio

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
