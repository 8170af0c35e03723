"""Exports read from a real hot standby (USEREXPORT_EXPORT_DATABASE_URL): a `pg_basebackup -R` of a
private cluster (tests/pg_cluster.py), streaming on a port of its own.

- The export reads there: the primary's processes spend a small fraction of the CPU the same
  export costs them without the standby (measured from /proc), and the file is the same.
- A standby whose replay is paused (`pg_wal_replay_pause()`) does not give a file older than the
  job: the export waits for it, then reads the primary, and the file has the users added before
  the job; one that resumes within the wait is read, and has them too.
- An unreachable standby: the export reads the primary at once; the standby's own health service
  says why while the server stays SERVING.
"""
from __future__ import annotations

import csv
import io
import math
import pathlib
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.databases import fresh_postgres_database
from tests.harness import ServerHandle, free_port, new_tenant
from tests.integration.support import Caller, download
from tests.pg_cluster import PgCluster, PgInstance, wait_replayed
from tests.polling import eventually
from tests.test_metrics import Samples, one, parse, scrape
from userexport.v1 import users_export_pb2 as pb
from userexport_server.app import SERVICE_NAME, STANDBY_SERVICE
from userexport_server.db.engine import make_engine
from userexport_server.db.migrate import upgrade
from userexport_server.seed import seed_users

pytestmark = pytest.mark.private_postgres

USERS, ADDED = 200_000, 500
SETTINGS: dict[str, Any] = {"slice_users": USERS // 4, "workers": 2, "health_interval_seconds": 0.2}
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


class Seeded:
    """A database on the private primary with USERS users of one tenant, and its name on the standby."""

    def __init__(self, url: str, primary: PgCluster, standby: PgInstance) -> None:
        self.url, self.primary, self.standby = url, primary, standby
        self.database = url.rsplit("/", 1)[1]
        self.standby_url = standby.url(self.database)
        self.tenant = new_tenant()
        self.added = 0

    def add_users(self, count: int) -> None:
        """More users of the tenant, after those there are."""
        engine = make_engine(self.url)
        seed_users(engine, tenant=self.tenant, users=count, start_index=USERS + self.added)
        engine.dispose()
        self.added += count


@pytest.fixture(scope="module")
def seeded(private_postgres: PgCluster, private_standby: PgInstance) -> Iterator[Seeded]:
    with fresh_postgres_database(private_postgres.url()) as url:
        engine = make_engine(url)
        upgrade(engine)
        seeded = Seeded(url, private_postgres, private_standby)
        seed_users(engine, tenant=seeded.tenant, users=USERS)
        # Done now, not by autovacuum on the primary in the middle of a test that counts its CPU
        # (0.34 CPU-s once, when a loaded machine moved autovacuum's round into the export).
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM (ANALYZE) users")
        engine.dispose()
        wait_replayed(private_postgres, private_standby, timeout=60)
        yield seeded


@pytest.fixture
def server(seeded: Seeded, tmp_path: pathlib.Path) -> Iterator[Any]:
    """Starts servers on the seeded database (with any settings), stopped after the test."""
    started: list[ServerHandle] = []

    def start(**overrides: Any) -> ServerHandle:
        handle = ServerHandle(tmp_path / f"server{len(started)}", database_url=seeded.url,
                              **{**SETTINGS, **overrides})
        started.append(handle)
        return handle

    yield start
    for handle in started:
        handle.stop()


def export(server: ServerHandle, tenant: str) -> tuple[pb.Job, bytes]:
    caller = Caller(server, tenant)
    try:
        final = caller.finish(caller.create(format=pb.ExportRequest.CSV).id)
    finally:
        caller.close()
    assert final.status == pb.Job.COMPLETED, final.error
    return final, download(final.location)


def all_reads(seeded: Seeded) -> int:
    """The export's reads of the users: its planning and one per slice."""
    return 1 + math.ceil((USERS + seeded.added) / SETTINGS["slice_users"])


def user_ids(content: bytes) -> list[str]:
    return [row[0] for row in csv.reader(io.StringIO(content.decode(), newline=""))][1:]


def reads(samples: Samples) -> dict[tuple[str, str], float]:
    """userexport_export_reads_total by (database, fallback)."""
    return {(dict(labels)["database"], dict(labels)["fallback"]): value for (name, labels), value in samples.items()
            if name == "userexport_export_reads_total"}


def health(server: ServerHandle, service: str) -> int:
    with grpc.insecure_channel(server.target) as channel:
        return int(health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                             timeout=5).status)


def test_an_export_reads_on_the_standby_and_its_file_equals_the_primarys(seeded: Seeded, server: Any) -> None:
    plain = server()
    cpu = seeded.primary.cpu_seconds()
    _, from_primary = export(plain, seeded.tenant)
    primary_alone = seeded.primary.cpu_seconds() - cpu
    plain.stop()

    standby_server = server(export_database_url=seeded.standby_url)
    eventually(lambda: health(standby_server, STANDBY_SERVICE) == SERVING, "the standby healthy")
    cpu, standby_cpu = seeded.primary.cpu_seconds(), seeded.standby.cpu_seconds()
    _, from_standby = export(standby_server, seeded.tenant)
    primary_with_standby = seeded.primary.cpu_seconds() - cpu
    standby_spent = seeded.standby.cpu_seconds() - standby_cpu

    print(f"primary CPU: {primary_alone:.2f} s alone, {primary_with_standby:.2f} s with the standby, "
          f"which spent {standby_spent:.2f} s")
    assert from_standby == from_primary and len(user_ids(from_standby)) == USERS + seeded.added
    assert primary_with_standby < 0.2 * primary_alone, (primary_alone, primary_with_standby)
    assert standby_spent > 0.5 * primary_alone, (primary_alone, standby_spent)
    counted = reads(parse(scrape(standby_server.metrics_port)))
    assert counted == {("standby", ""): all_reads(seeded)}, counted


def test_a_paused_standby_is_waited_for_then_the_primary_read_and_the_file_is_not_older_than_the_job(
        seeded: Seeded, server: Any) -> None:
    wait = 2.0
    standby_server = server(export_database_url=seeded.standby_url, export_database_wait_seconds=wait)
    seeded.standby.pause_replay()
    try:
        seeded.add_users(ADDED)  # committed before the job: the export must have them
        eventually(lambda: health(standby_server, STANDBY_SERVICE) == NOT_SERVING, "the standby reported paused")
        # A probe between the pause and the users' commit reports paused with no lag yet.
        lag = eventually(lambda: one(parse(scrape(standby_server.metrics_port)),
                                     "userexport_standby_replay_lag_bytes"), "the standby's lag in bytes")
        started = time.monotonic()
        final, content = export(standby_server, seeded.tenant)
        took = time.monotonic() - started
        assert health(standby_server, "") == SERVING and health(standby_server, SERVICE_NAME) == SERVING
        behind = one(parse(scrape(standby_server.metrics_port)), "userexport_standby_replay_lag_seconds")
    finally:
        seeded.standby.execute("SELECT pg_wal_replay_resume()")
    ids = user_ids(content)
    assert final.users_written == len(ids) == USERS + seeded.added and ids == sorted(set(ids))
    assert lag > 0 and behind >= wait, (lag, behind)
    assert took >= wait, f"the export took {took:.1f} s: it did not wait for the standby"
    counted = reads(parse(scrape(standby_server.metrics_port)))
    assert counted == {("primary", "behind"): all_reads(seeded)}, counted
    eventually(lambda: health(standby_server, STANDBY_SERVICE) == SERVING, "the standby healthy again once resumed")
    eventually(lambda: one(parse(scrape(standby_server.metrics_port)), "userexport_standby_replay_lag_seconds") == 0,
               "the standby caught up")


def test_a_standby_that_catches_up_within_the_wait_is_read(seeded: Seeded, server: Any) -> None:
    standby_server = server(export_database_url=seeded.standby_url, export_database_wait_seconds=20)
    caller = Caller(standby_server, seeded.tenant)
    seeded.standby.pause_replay()
    try:
        seeded.add_users(ADDED)
        job = caller.create(format=pb.ExportRequest.CSV)
        time.sleep(1.0)
        assert caller.get(job.id).users_total == 0, "planned before the standby had the job"
    finally:
        seeded.standby.execute("SELECT pg_wal_replay_resume()")
    final = caller.finish(job.id)
    assert final.status == pb.Job.COMPLETED, final.error
    assert len(user_ids(download(final.location))) == USERS + seeded.added
    counted = reads(parse(scrape(standby_server.metrics_port)))
    assert counted == {("standby", ""): all_reads(seeded)}, counted


def test_an_unreachable_standby_is_passed_over_at_once(seeded: Seeded, server: Any) -> None:
    nowhere = f"postgresql://postgres@127.0.0.1:{free_port()}/{seeded.database}"
    standby_server = server(export_database_url=nowhere)
    eventually(lambda: health(standby_server, STANDBY_SERVICE) == NOT_SERVING, "the standby reported unreachable")
    started = time.monotonic()
    final, content = export(standby_server, seeded.tenant)
    assert time.monotonic() - started < 10
    assert len(user_ids(content)) == final.users_written == USERS + seeded.added
    assert health(standby_server, "") == SERVING
    counted = reads(parse(scrape(standby_server.metrics_port)))
    assert counted == {("primary", "unavailable"): all_reads(seeded)}, counted
    assert one(parse(scrape(standby_server.metrics_port)), "userexport_health_check_healthy", check="standby") == 0
