"""The PostgreSQL event listener never dies: hostile NOTIFY payloads from any role, failing reads and
observers, and a killed or refused listening connection all leave the LISTEN thread alive, and a
watcher on one replica still sees every transition (above all the terminal one) of a job run by
another. Notifications come from the jobs table's trigger, so a change committed by any writer is
announced, even one that never runs the service's code after its COMMIT."""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import pathlib
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from tests.databases import BACKENDS, fresh_postgres_database
from tests.harness import ServerHandle, new_tenant
from tests.integration.pg_faults import admin_execute, listener_pids, notify, terminate_listeners
from tests.integration.support import Caller
from tests.polling import eventually
from userexport.v1 import users_export_pb2 as pb
from userexport_server.db.engine import make_engine
from userexport_server.db.migrate import upgrade
from userexport_server.jobs.events import EventBus, JobChange
from userexport_server.jobs.model import Job, JobStatus
from userexport_server.jobs.pg_events import PgListener

pytestmark = pytest.mark.skipif("postgresql" not in BACKENDS, reason="LISTEN/NOTIFY is PostgreSQL's")

HOSTILE_PAYLOADS = [
    "garbage",
    "",
    "x" * 7999,  # NOTIFY's limit is 8000 bytes
    "a:b",  # too few parts
    "0123456789ab:job_AAAAAAAAAAAAAAAA:1",  # too few: no status
    "0123456789ab:job_AAAAAAAAAAAAAAAA:1:pending:extra",  # too many
    "0123456789ab:job_AAAAAAAAAAAAAAAA:1:done",  # no such status
    "0123456789ab:job_AAAAAAAAAAAAAAAA:one:pending",  # version not a number
    "0123456789ab:job_AAAAAAAAAAAAAAAA:1:pending\n",  # a trailing newline is not a whole match
    "0123456789ab:job_AAAAAAAAAAAAAAAA:\u0661:pending",  # a non-ASCII digit
    "0123456789ab:../../etc/passwd:2:pending",
]


@pytest.fixture
def database() -> Iterator[str]:
    with fresh_postgres_database() as url:
        yield url


def replica(data_dir: pathlib.Path, url: str, workers: int) -> ServerHandle:
    """Replicas share one data dir (its generated token secret), as they share a JWT secret in production."""
    return ServerHandle(data_dir, database_url=url, workers=workers)


def watch_in_background(server: ServerHandle, caller: Caller, job_id: str) -> concurrent.futures.Future[list[pb.Job]]:
    """A watch of the job on another thread, returned once `server` has it subscribed."""
    pool = concurrent.futures.ThreadPoolExecutor(1)
    future = pool.submit(caller.watch, job_id, 60)
    pool.shutdown(wait=False)
    eventually(lambda: server.app.bus.watcher_count(job_id), "the watcher subscribing")
    return future


def listener_alive(server: ServerHandle) -> bool:
    listener = server.app.listener
    return listener is not None and listener._thread is not None and listener._thread.is_alive()


def listener_back(server: ServerHandle, old_pids: list[int]) -> bool:
    """The replica LISTENs again on a new backend."""
    return server.app.bus.healthy() is None and any(pid not in old_pids for pid in listener_pids(server.settings.
                                                                                                   database_url))


def test_hostile_payloads_and_a_killed_listener_leave_cross_replica_watch_working(
        database: str, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    """Garbage, empty, oversized and wrong-shape payloads are dropped (logged at a bounded rate, not
    once each) and the terminated listener connection is made anew; replica B (no workers) still
    streams COMPLETED of the job replica A runs afterwards, and B's listener thread is alive."""
    caplog.set_level(logging.INFO, logger="userexport_server")
    tenant = new_tenant()
    b = replica(tmp_path, database, workers=0)
    a: ServerHandle | None = None
    try:
        b.seed(200, tenant=tenant)
        caller = Caller(b, tenant)
        job = caller.create(format=pb.ExportRequest.CSV)
        watched = watch_in_background(b, caller, job.id)

        notify(database, *HOSTILE_PAYLOADS * 5)
        killed = terminate_listeners(database)
        assert killed, "no LISTEN backend found"
        notify(database, *HOSTILE_PAYLOADS)
        eventually(lambda: listener_back(b, killed), "B's listener reconnecting")

        a = replica(tmp_path, database, workers=1)  # runs the pending job
        messages = watched.result(timeout=60)
        assert messages[-1].status == pb.Job.COMPLETED, messages[-1]
        assert listener_alive(b) and b.app.bus.healthy() is None
        dropped = caplog.text.count("pg listener dropped a malformed notification")
        assert 1 <= dropped <= 2, f"{dropped} lines for {len(HOSTILE_PAYLOADS) * 6} malformed notifications"
        assert "pg listener lost its connection" in caplog.text
    finally:
        if a is not None:
            a.stop()
        b.stop()


@pytest.fixture
def own_role(database: str) -> Iterator[str]:
    """A login role of its own, so one replica alone can be shut out with ALTER ROLE .. NOLOGIN."""
    upgrade_engine = make_engine(database)
    upgrade(upgrade_engine)  # the tables belong to postgres, so the role can be dropped afterwards
    upgrade_engine.dispose()
    role = f"ue_replica_{uuid.uuid4().hex[:8]}"
    admin_execute(f'CREATE ROLE "{role}" LOGIN SUPERUSER')
    try:
        yield database.replace("postgresql://postgres@", f"postgresql://{role}@", 1)
    finally:
        admin_execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,))
        admin_execute(f'DROP ROLE IF EXISTS "{role}"')


def test_terminal_transition_while_the_listener_is_away_reaches_the_watcher_after_the_reconnect(
        database: str, own_role: str, tmp_path: pathlib.Path) -> None:
    """B's listener is killed and cannot reconnect (its role may not log in) while A runs the job to
    COMPLETED, so the NOTIFY of that change never reaches B; once B reconnects, its resync reads the
    job again and the watcher gets COMPLETED all the same."""
    tenant = new_tenant()
    role = own_role.split("//", 1)[1].split("@", 1)[0]
    b = replica(tmp_path, own_role, workers=0)
    a: ServerHandle | None = None
    try:
        b.seed(100, tenant=tenant)
        caller = Caller(b, tenant)
        job = caller.create(format=pb.ExportRequest.CSV)
        watched = watch_in_background(b, caller, job.id)

        admin_execute(f'ALTER ROLE "{role}" NOLOGIN')
        killed = admin_execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s "
                               "AND query LIKE 'LISTEN%%'", (role,))
        assert len(killed) == 1
        eventually(b.app.bus.healthy, "B's listener noticing it is down")

        a = replica(tmp_path, database, workers=1)  # runs the job while B hears nothing
        eventually(lambda: Caller(a, tenant).get(job.id).status == pb.Job.COMPLETED, "the job completing")
        assert not watched.done(), "the watcher ended although B was not listening"

        admin_execute(f'ALTER ROLE "{role}" LOGIN')
        messages = watched.result(timeout=30)
        assert messages[-1].status == pb.Job.COMPLETED, messages[-1]
        assert listener_alive(b) and b.app.bus.healthy() is None
    finally:
        admin_execute(f'ALTER ROLE "{role}" LOGIN')
        if a is not None:
            a.stop()
        b.stop()


def test_a_failing_read_or_observer_does_not_kill_the_listener(
        database: str, caplog: pytest.LogCaptureFixture) -> None:
    """The job read for watchers raises, and so does an observer of the bus: each failure is logged,
    and the same listener handles the next notifications, which reach the observers and watchers."""
    caplog.set_level(logging.INFO, logger="userexport_server")
    job_id, origin = "job_" + "A" * 16, "0" * 12
    heard: list[JobChange] = []
    loaded: list[str] = []

    def store_down(_job_id: str) -> Job | None:
        raise RuntimeError("the store is down")

    def load(found: str) -> Job | None:
        loaded.append(found)
        return None

    def broken(_change: JobChange) -> None:
        raise RuntimeError("observer bug")

    bus = EventBus()
    listener = PgListener(database, "f" * 12, bus, load=store_down)
    bus.observe(broken)
    bus.observe(heard.append)

    async def scenario() -> None:
        with bus.subscribe(job_id):
            await asyncio.to_thread(notify, database, f"{origin}:{job_id}:1:pending", f"{origin}:{job_id}:2:processing")
            await asyncio.to_thread(eventually, lambda: "reloading a job for its watchers failed" in caplog.text
                                    and "event observer failed" in caplog.text, "the read and the observer failing")
            listener.load = load
            await asyncio.to_thread(notify, database, f":{job_id}:3:cancelled")  # from a writer with no origin
            await asyncio.to_thread(eventually, lambda: loaded and len(heard) == 3, "the next notifications handled")

    listener.start()
    try:
        asyncio.run(scenario())
        assert heard[-1] == JobChange(job_id, 3, JobStatus.CANCELLED)
        assert listener._thread is not None and listener._thread.is_alive() and listener.healthy() is None
    finally:
        listener.stop()


def test_a_change_committed_by_any_writer_reaches_other_replicas_within_a_second(
        database: str, tmp_path: pathlib.Path) -> None:
    """The old way, the writer announced its change after COMMIT from a second connection, so a writer
    killed between the two (or refused that connection by a role's connection limit) left every
    other replica serving the old version. Now the trigger announces it inside the transaction: here
    the change is committed by a bare SQL session that never runs the service's code, and replica B
    (cache warm, a watcher attached) serves and streams it within a second. A change rolled back is
    never announced."""
    tenant = new_tenant()
    b = replica(tmp_path, database, workers=0)
    try:
        b.seed(10, tenant=tenant)
        caller = Caller(b, tenant)
        job = caller.create(format=pb.ExportRequest.CSV)
        assert caller.get(job.id).status == pb.Job.PENDING  # now in B's cache
        watched = watch_in_background(b, caller, job.id)

        with psycopg.connect(database) as rolled_back:
            rolled_back.execute("UPDATE jobs SET status = 'failed', version = version + 1 WHERE id = %s", (job.id,))
            rolled_back.rollback()
        admin_sql(database, "UPDATE jobs SET status = 'cancelled', finished_at = now(), version = version + 1 "
                            "WHERE id = %s", job.id)
        committed = time.monotonic()
        messages = watched.result(timeout=5)
        assert [m.status for m in messages] == [pb.Job.PENDING, pb.Job.CANCELLED], "the rolled back FAILED leaked"
        assert time.monotonic() - committed < 1.0
        assert caller.get(job.id).status == pb.Job.CANCELLED
    finally:
        b.stop()


def admin_sql(database: str, sql: str, *params: object) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(sql, params)
