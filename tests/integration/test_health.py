"""Health tells the truth: grpc.health.v1 (overall and for the service) and `userexport-server health`
turn NOT_SERVING while the export workers are dead, the database refuses connections or the event
listener is down, and SERVING again once the fault is gone."""
from __future__ import annotations

import logging
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.harness import ServerHandle, new_tenant
from tests.integration.pg_faults import connections_refused, terminate_all, terminate_listeners
from tests.integration.support import Caller
from tests.integration.test_read_starvation import retry_delay
from tests.polling import eventually
from userexport.v1 import users_export_pb2 as pb
from userexport_server.app import SERVICE_NAME

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
FAST = dict(health_interval_seconds=0.1)


def statuses(server: ServerHandle) -> set[int]:
    """The status of the whole server and of the service; one value when they agree."""
    with grpc.insecure_channel(server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return {stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
                for service in ("", SERVICE_NAME)}


def health_command(server: ServerHandle) -> subprocess.CompletedProcess[str]:
    """The Dockerfile HEALTHCHECK, run as it is run there."""
    return subprocess.run([sys.executable, "-m", "userexport_server.main", "health", "--target", server.target],
                          capture_output=True, text=True, timeout=30, check=False)


def test_dead_workers_make_health_not_serving_and_the_health_command_exit_1(
        make_server, caplog: pytest.LogCaptureFixture) -> None:
    """Every export worker thread exits for real (the pool is shut down under the running server):
    both statuses turn NOT_SERVING, the transition is logged once with its reason, and the
    HEALTHCHECK command exits 1 where it exited 0 before."""
    caplog.set_level(logging.INFO, logger="userexport_server")
    server = make_server(**FAST)
    assert statuses(server) == {SERVING}
    healthy = health_command(server)
    assert (healthy.returncode, healthy.stdout.strip()) == (0, "SERVING"), healthy.stderr

    server.app.workers.shutdown(0)
    assert not any(thread.is_alive() for thread in server.app.workers._threads)
    eventually(lambda: statuses(server) == {NOT_SERVING}, "health turning NOT_SERVING")
    unhealthy = health_command(server)
    assert (unhealthy.returncode, unhealthy.stdout.strip()) == (1, "NOT_SERVING"), unhealthy.stderr
    changes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("health changed")]
    assert changes[0] == "health changed status=SERVING reasons=none", changes
    assert len(changes) == 2 and "status=NOT_SERVING reasons=workers: " in changes[1], changes


def test_database_refusing_connections_makes_health_not_serving_until_it_is_back(
        make_server, backend: str, caplog: pytest.LogCaptureFixture) -> None:
    """ALTER DATABASE .. ALLOW_CONNECTIONS false and every server connection terminated: the
    database check and the listener fail, health is NOT_SERVING, and a GetJob meanwhile is
    UNAVAILABLE with a RetryInfo (not INTERNAL); connections allowed again, the pool and the
    listener reconnect, health is SERVING and the job reads again."""
    if backend != "postgresql":
        pytest.skip("refusing connections is a PostgreSQL fault")
    caplog.set_level(logging.INFO, logger="userexport_server")
    server = make_server(workers=0, **FAST)
    url = server.settings.database_url
    caller = Caller(server, new_tenant())
    job = caller.create(format=pb.ExportRequest.CSV)
    with connections_refused(url):
        terminate_all(url)
        eventually(lambda: statuses(server) == {NOT_SERVING}, "health turning NOT_SERVING")
        eventually(lambda: "database: unreachable" in caplog.text, "the database reason being logged")
        with pytest.raises(grpc.RpcError) as refused:
            caller.get(job.id)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
        assert retry_delay(refused.value) == 1.0
    eventually(lambda: statuses(server) == {SERVING}, "health turning SERVING again")
    assert "health changed status=SERVING" in caplog.text
    assert caller.get(job.id).id == job.id


def test_event_listener_down_makes_health_not_serving_until_it_reconnects(
        make_server, backend: str, caplog: pytest.LogCaptureFixture) -> None:
    """Only the LISTEN backend is terminated, and it cannot reconnect while connections are refused:
    health is NOT_SERVING naming the event listener; allowed again, it reconnects and health is
    SERVING."""
    if backend != "postgresql":
        pytest.skip("the event listener is PostgreSQL's")
    caplog.set_level(logging.INFO, logger="userexport_server")
    server = make_server(**FAST)
    url = server.settings.database_url
    with connections_refused(url):
        assert terminate_listeners(url)
        eventually(lambda: statuses(server) == {NOT_SERVING}, "health turning NOT_SERVING")
        eventually(lambda: "events: event listener has no database connection" in caplog.text,
                   "the listener reason being logged")
        assert server.app.listener is not None and server.app.listener._thread is not None
        assert server.app.listener._thread.is_alive()
    eventually(lambda: statuses(server) == {SERVING}, "health turning SERVING again")
    assert server.app.bus.healthy() is None
