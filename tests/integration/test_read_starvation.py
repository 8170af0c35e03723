"""Blocking work cannot starve reads: creates queued on a held write lock run on the write threads,
so a GetJob still answers at once; when the lock outlasts the database timeout the creates end
UNAVAILABLE with a RetryInfo (never INTERNAL, never a hang), and work again once it is released."""
from __future__ import annotations

import concurrent.futures
import contextlib
import sqlite3
import time
from collections.abc import Iterator

import grpc
import psycopg
from google.rpc import error_details_pb2

from tests.harness import ServerHandle
from tests.integration.support import Caller, detail, error_reason
from userexport.v1 import users_export_pb2 as pb

CREATES = 8
LOCK_TIMEOUT_SECONDS = 2.0  # the server's busy (SQLite) or statement (PostgreSQL) timeout


@contextlib.contextmanager
def write_lock_held(server: ServerHandle, backend: str, tenant: str) -> Iterator[None]:
    """Another client holds what a create must take: SQLite's write lock (BEGIN IMMEDIATE from its
    own sqlite3 connection), or on PostgreSQL the tenant's advisory lock that creates serialise on."""
    if backend == "sqlite":
        holder = sqlite3.connect(server.data_dir / "userexport.db", isolation_level=None, timeout=30)
        holder.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            holder.execute("ROLLBACK")
            holder.close()
    else:
        with psycopg.connect(server.settings.database_url, autocommit=True) as session:
            session.execute("SELECT pg_advisory_lock(hashtext(%s))", (f"tenant:{tenant}",))
            yield


def retry_delay(error: grpc.RpcError) -> float | None:
    """The google.rpc.RetryInfo delay of an error, in seconds."""
    info = detail(error, error_details_pb2.RetryInfo)
    return info.retry_delay.ToTimedelta().total_seconds() if info else None


def test_creates_waiting_on_a_held_write_lock_do_not_delay_reads_and_end_unavailable_with_retry_info(
        make_server, backend: str, tenant: str) -> None:
    server = make_server(workers=0, max_active_jobs_per_tenant=CREATES + 2,
                         db_busy_timeout_seconds=LOCK_TIMEOUT_SECONDS,
                         db_statement_timeout_seconds=LOCK_TIMEOUT_SECONDS)
    caller = Caller(server, tenant)
    existing = caller.create(format=pb.ExportRequest.CSV)

    def create() -> grpc.RpcError | pb.Job:
        try:
            return caller.create(format=pb.ExportRequest.JSON)
        except grpc.RpcError as error:
            return error

    with write_lock_held(server, backend, tenant), concurrent.futures.ThreadPoolExecutor(CREATES) as pool:
        started = time.monotonic()
        creates = [pool.submit(create) for _ in range(CREATES)]
        time.sleep(0.3)  # every write thread is now waiting on the lock, more creates queued behind them
        read_seconds = []
        for _ in range(5):
            before = time.monotonic()
            assert caller.get(existing.id).id == existing.id
            read_seconds.append(time.monotonic() - before)
        assert max(read_seconds) < 1.0, f"GetJob took {max(read_seconds):.2f} s behind {CREATES} waiting creates"
        assert not any(c.done() for c in creates), "the creates did not wait for the lock"
        results = [c.result(timeout=60) for c in creates]
        create_seconds = time.monotonic() - started

    for result in results:
        assert isinstance(result, grpc.RpcError), result
        assert result.code() == grpc.StatusCode.UNAVAILABLE, (result.code(), result.details())
        assert error_reason(result) == "DATABASE_UNAVAILABLE"
        assert retry_delay(result) == 1.0
        assert "retry" in result.details() and "SELECT" not in result.details()
    assert create_seconds < 8 * LOCK_TIMEOUT_SECONDS, f"creates took {create_seconds:.1f} s to give up"
    assert caller.create(format=pb.ExportRequest.JSON).status == pb.Job.PENDING
