"""Reads of a job this replica knows at its newest version skip the database, and a change made on
another replica reaches them through the event feed (PostgreSQL, two servers on one database)."""
from __future__ import annotations

import time

import grpc
import psycopg
import pytest

from tests.databases import database_settings
from tests.harness import ServerHandle
from tests.integration.support import Caller
from tests.polling import eventually
from userexport.v1 import users_export_pb2 as pb


@pytest.fixture
def pg_only(backend: str) -> None:
    if backend != "postgresql":
        pytest.skip("SQLite's WAL readers are never blocked, and one SQLite server has no peer replicas")


def test_a_known_job_is_read_while_the_jobs_table_is_locked(pg_only: None, make_server, tenant: str) -> None:
    """A session holds ACCESS EXCLUSIVE on jobs, so any read of it waits: GetJob and WatchJob of the
    job this server created still answer at once, with its newest version; a job it does not know
    must be read, waits, and ends UNAVAILABLE at the statement timeout."""
    server = make_server(workers=0, db_statement_timeout_seconds=2)
    caller = Caller(server, tenant)
    job = caller.create(format=pb.ExportRequest.CSV)
    with psycopg.connect(server.settings.database_url, autocommit=True) as session, session.transaction():
        session.execute("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        got = caller.get(job.id)
        stream = caller.stub.WatchJob(pb.WatchJobRequest(id=job.id), metadata=caller.metadata, timeout=5)
        first = next(stream)
        stream.cancel()
        assert time.monotonic() - started < 1.0
        assert (got.id, got.version, got.status) == (job.id, job.version, pb.Job.PENDING)
        assert first.version == job.version
        with pytest.raises(grpc.RpcError) as refused:
            caller.get("job_" + "Z" * 16)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_change_on_another_replica_replaces_what_this_one_holds(pg_only: None, tmp_path, tenant: str) -> None:
    with database_settings("postgresql") as database:
        first = ServerHandle(tmp_path / "shared", workers=0, **database)
        second = ServerHandle(tmp_path / "shared", workers=0, **database)
        try:
            on_first, on_second = Caller(first, tenant), Caller(second, tenant)
            job = on_first.create(format=pb.ExportRequest.JSON)
            assert on_second.get(job.id).status == pb.Job.PENDING  # now held by the second replica
            cancelled = on_first.cancel(job.id)
            def served_cancelled() -> pb.Job | None:
                got = on_second.get(job.id)
                return got if got.status == pb.Job.CANCELLED else None

            seen = eventually(served_cancelled, "the second replica serving the cancelled version", timeout=5)
            assert seen.version == cancelled.version
            assert all(on_second.get(job.id).status == pb.Job.CANCELLED for _ in range(20))
        finally:
            second.stop()
            first.stop()


def test_reads_within_a_second_share_one_signature_then_it_is_signed_again(server: ServerHandle,
                                                                           tenant: str) -> None:
    server.seed(5, tenant=tenant)
    caller = Caller(server, tenant)
    try:
        job = caller.finish(caller.create(format=pb.ExportRequest.CSV).id)
        assert job.status == pb.Job.COMPLETED
        time.sleep(1.1)  # past whatever the watch was handed
        first, second = caller.get(job.id), caller.get(job.id)
        assert (second.location, second.location_expires_at) == (first.location, first.location_expires_at)
        time.sleep(1.1)
        third = caller.get(job.id)
    finally:
        caller.close()
    assert third.location_expires_at.ToDatetime() > first.location_expires_at.ToDatetime()
    assert third.location != first.location
