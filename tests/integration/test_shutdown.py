"""Graceful shutdown of a real server process mid-export: exit 0, and no job or file is lost."""
from __future__ import annotations

import re
import signal

import pytest

from tests.harness import ServerProcess, new_tenant
from tests.integration.support import Caller, download
from userexport.v1 import users_export_pb2 as pb
from userexport_server.db.engine import make_engine
from userexport_server.db.migrate import upgrade
from userexport_server.seed import seed_users

USERS = 150_000


@pytest.fixture
def seeded_dir(tmp_path):
    tenant = new_tenant()
    engine = make_engine(f"sqlite:///{tmp_path / 'userexport.db'}")
    upgrade(engine)
    seed_users(engine, tenant=tenant, users=USERS)
    engine.dispose()
    return tmp_path, tenant


def start_export(server: ServerProcess, tenant: str) -> tuple[Caller, str]:
    caller = Caller(server, tenant)  # type: ignore[arg-type]
    job = caller.create(format=pb.ExportRequest.JSON)
    for message in caller.stub.WatchJob(pb.WatchJobRequest(id=job.id), metadata=caller.metadata, timeout=60):
        if message.status == pb.Job.PROCESSING and message.users_written > 0:
            break
    return caller, job.id


def finish_on_a_restart(data_dir, tenant: str, job_id: str, env: dict[str, str], stop: int) -> str:
    """A new server on the same data finishes the job, whole and correct, and stops cleanly on
    `stop`; its log."""
    server = ServerProcess(data_dir, env)
    try:
        caller = Caller(server, tenant)  # type: ignore[arg-type]
        assert caller.get(job_id).status in (pb.Job.PENDING, pb.Job.PROCESSING, pb.Job.COMPLETED)
        final = caller.finish(job_id)
        assert final.status == pb.Job.COMPLETED and final.users_written == USERS
        assert len(download(final.location).splitlines()) == USERS
        server.signal(stop)
        assert server.wait(30) == 0
    finally:
        server.stop()
    return server.log_text()


def test_sigterm_hands_back_a_running_export_and_a_restart_finishes_it(seeded_dir) -> None:
    """With no grace, the running slices are handed back (pending) and their partial files
    removed; a restarted server takes them and completes the job."""
    data_dir, tenant = seeded_dir
    env = {"USEREXPORT_SHUTDOWN_GRACE_SECONDS": "0", "USEREXPORT_GZIP_LEVEL": "9"}
    first = ServerProcess(data_dir, env)
    try:
        _caller, job_id = start_export(first, tenant)
        first.signal(signal.SIGTERM)
        assert first.wait(30) == 0, first.log_text()
    finally:
        first.stop()
    assert f"slice stopped job_id={job_id} tenant={tenant} slice=0 reason=shutdown" in first.log_text()
    files = [p.name for p in (data_dir / "files").rglob("*") if p.is_file()]
    assert not [name for name in files if ".tmp-" in name], "no partial file is left"
    finish_on_a_restart(data_dir, tenant, job_id, {"USEREXPORT_GZIP_LEVEL": "1"}, signal.SIGINT)


def test_sigterm_with_grace_lets_the_running_slice_finish(seeded_dir) -> None:
    """With grace, the slice running at SIGTERM is finished and recorded, nothing is cut short, and
    the slices not started are left pending; a restarted server does only those."""
    data_dir, tenant = seeded_dir
    env = {"USEREXPORT_SHUTDOWN_GRACE_SECONDS": "60", "USEREXPORT_SLICE_USERS": "50000"}
    server = ServerProcess(data_dir, env)
    try:
        _caller, job_id = start_export(server, tenant)
        server.signal(signal.SIGTERM)
        assert server.wait(90) == 0, server.log_text()
    finally:
        server.stop()
    first = server.log_text()
    assert re.search(rf"slice done job_id={job_id} \S+ slice=0 .* recorded=True", first), first
    assert "slice stopped" not in first
    restarted = finish_on_a_restart(data_dir, tenant, job_id, env, signal.SIGTERM)
    assert f"slice claimed job_id={job_id} tenant={tenant} slice=0" not in restarted, "slice 0 was redone"
