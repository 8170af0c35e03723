"""PostgreSQL restarted mid-export, for real (`pg_ctl restart -m fast`, and `-m immediate`: killed,
then crash recovery), on a private cluster (tests/pg_cluster.py), never the shared one. Replica A
exports; replica B has no workers and a watcher on the job. The job completes whole (every user once,
in order), B's watcher gets COMPLETED, and health goes NOT_SERVING during the restart and SERVING
after it, on both replicas.
"""
from __future__ import annotations

import csv
import io
import pathlib
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.databases import seeded_postgres_database
from tests.harness import ServerHandle
from tests.integration.support import Caller, download, wait_until_writing
from tests.pg_cluster import PgCluster
from tests.polling import eventually
from userexport.v1 import users_export_pb2 as pb

pytestmark = pytest.mark.private_postgres

USERS = 200_000
# Four slices at the slowest gzip level, so the restart lands mid-stream; fast health rounds, so the
# second or so the database is away is seen.
SETTINGS: dict[str, Any] = {"slice_users": USERS // 4, "gzip_level": 9, "health_interval_seconds": 0.1}
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def seeded(private_postgres: PgCluster) -> Iterator[tuple[str, str]]:
    with seeded_postgres_database(USERS, private_postgres.url()) as seeded:
        yield seeded


class HealthWatch:
    """Every status a server's overall health reports, from its grpc.health.v1 Watch stream."""

    def __init__(self, server: ServerHandle) -> None:
        self.channel = grpc.insecure_channel(server.target)
        self.stream = health_pb2_grpc.HealthStub(self.channel).Watch(health_pb2.HealthCheckRequest(service=""))
        self.seen: list[int] = []
        self.thread = threading.Thread(target=self._follow, daemon=True)
        self.thread.start()

    def _follow(self) -> None:
        try:
            for reply in self.stream:
                self.seen.append(reply.status)
        except grpc.RpcError:
            pass  # cancelled by close()

    def close(self) -> None:
        self.stream.cancel()
        self.channel.close()


class Watcher:
    """A WatchJob stream in a thread of its own, collecting every message."""

    def __init__(self, caller: Caller, job_id: str) -> None:
        self.messages: list[pb.Job] = []
        self.error: grpc.RpcError | None = None
        self.thread = threading.Thread(target=self._follow, args=(caller, job_id), daemon=True)
        self.thread.start()

    def _follow(self, caller: Caller, job_id: str) -> None:
        try:
            self.messages.extend(caller.watch(job_id, timeout=60))
        except grpc.RpcError as error:
            self.error = error


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_an_export_survives_a_postgresql_restart_and_a_watcher_elsewhere_sees_it_complete(
        mode: str, seeded: tuple[str, str], private_postgres: PgCluster, tmp_path: pathlib.Path) -> None:
    url, tenant = seeded
    a = ServerHandle(tmp_path, database_url=url, workers=2, **SETTINGS)  # one data folder: the local storage
    b = ServerHandle(tmp_path, database_url=url, workers=0, **SETTINGS)
    health_a, health_b = HealthWatch(a), HealthWatch(b)
    try:
        job = Caller(a, tenant).create(format=pb.ExportRequest.CSV)
        watcher = Watcher(Caller(b, tenant), job.id)
        wait_until_writing(Caller(a, tenant), job.id)
        assert Caller(a, tenant).get(job.id).percentage_done < 50  # the restart lands mid-export
        private_postgres.restart(mode)
        watcher.thread.join(60)
        assert watcher.error is None, watcher.error
        final = watcher.messages[-1]
        assert final.status == pb.Job.COMPLETED, final.error
        rows = list(csv.reader(io.StringIO(download(final.location).decode(), newline="")))
        ids = [row[0] for row in rows[1:]]
        assert final.users_written == len(ids) == USERS and ids == sorted(set(ids))
        for watch in (health_a, health_b):
            eventually(lambda watch=watch: watch.seen[-1:] == [SERVING], "health SERVING again")  # type: ignore[misc]
            assert NOT_SERVING in watch.seen and watch.seen[0] == SERVING, watch.seen
    finally:
        health_a.close()
        health_b.close()
        a.stop()
        b.stop()
