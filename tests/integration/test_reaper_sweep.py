"""Expired files are really deleted, and the reaper's orphan sweep removes what a killed process left.

Real faults: a server process SIGKILLed mid-export, and a delete that fails because a directory
stands where the file was (unlink refuses it, even for root).
"""
from __future__ import annotations

import os
import pathlib
import signal
import time

from tests.harness import ServerHandle, ServerProcess, new_tenant
from tests.integration.support import Caller, download, wait_until_writing
from tests.polling import eventually
from userexport.v1 import users_export_pb2 as pb
from userexport_server.db.engine import make_engine
from userexport_server.db.migrate import upgrade
from userexport_server.seed import seed_users

USERS = 100_000
FAST_SWEEP = {"orphan_sweep_interval_seconds": 0.2, "reaper_interval_seconds": 0.2}


def leftovers(root: pathlib.Path) -> list[str]:
    """Partial `.tmp-` files and empty folders under the storage root."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if (p.is_file() and ".tmp-" in p.name) or (p.is_dir() and not any(p.iterdir())))


def test_sigkill_mid_export_leaves_a_partial_file_that_the_restarted_servers_sweep_removes(tmp_path) -> None:
    """The killed process's `.tmp-` file stays on disk; the restarted server rescues the job,
    and once it is completed the sweep deletes the partial file and leaves the finished files."""
    tenant = new_tenant()
    engine = make_engine(f"sqlite:///{tmp_path / 'userexport.db'}")
    upgrade(engine)
    seed_users(engine, tenant=tenant, users=USERS)
    engine.dispose()
    env = {"USEREXPORT_GZIP_LEVEL": "9", "USEREXPORT_LEASE_SECONDS": "2",
           **{f"USEREXPORT_{k.upper()}": str(v) for k, v in FAST_SWEEP.items()}}
    files = tmp_path / "files"
    first = ServerProcess(tmp_path, env)
    try:
        caller = Caller(first, tenant)  # type: ignore[arg-type]
        small = caller.finish(caller.create(format=pb.ExportRequest.CSV, limit=5).id)
        job = caller.create(format=pb.ExportRequest.JSON)
        wait_until_writing(caller, job.id)
        first.signal(signal.SIGKILL)
        first.wait(30)
    finally:
        first.stop()
    partial = [p for p in files.rglob(f"{job.id}/.*.tmp-*")]
    assert partial, "the killed export left its partial file"
    second = ServerProcess(tmp_path, env)
    try:
        caller = Caller(second, tenant)  # type: ignore[arg-type]
        final = caller.finish(job.id)
        assert final.status == pb.Job.COMPLETED and final.users_written == USERS
        eventually(lambda: not leftovers(files), f"the sweep to remove {leftovers(files)}", timeout=30)
        assert not any(p.exists() for p in partial)
        assert len(download(final.location).splitlines()) == USERS  # the finished files are kept
        assert len(download(caller.get(small.id).location).splitlines()) == 6
    finally:
        second.stop()


def test_cancelled_export_leaves_no_file_and_no_empty_folder(make_server) -> None:
    """Cancelling mid-export aborts the partial file; the sweep then removes the job's empty
    folder and the tenant's (today they stayed forever)."""
    server: ServerHandle = make_server(gzip_level=9, **FAST_SWEEP)
    tenant = new_tenant()
    server.seed(USERS, tenant=tenant)
    caller = Caller(server, tenant)
    job = caller.create(format=pb.ExportRequest.JSON)
    wait_until_writing(caller, job.id)
    assert (server.data_dir / "files" / tenant / job.id).is_dir()
    caller.cancel(job.id)
    eventually(lambda: not (server.data_dir / "files" / tenant).exists(), "the tenant's folder to go", timeout=30)
    assert leftovers(server.data_dir / "files") == []


def test_expired_file_whose_delete_fails_is_retried_until_it_is_gone(make_server, tmp_path) -> None:
    """The file is swapped for a non-empty directory, so the expiry's delete fails: the job reads
    EXPIRED with no location but keeps its key; once the file is back, the next round deletes it
    and clears the key, and the sweep removes the empty folder."""
    server: ServerHandle = make_server(job_ttl_seconds=3, **FAST_SWEEP)
    tenant = new_tenant()
    server.seed(20, tenant=tenant)
    caller = Caller(server, tenant)
    job = caller.finish(caller.create(format=pb.ExportRequest.CSV).id)
    assert job.status == pb.Job.COMPLETED
    path = server.data_dir / "files" / tenant / job.id / f"{tenant}.csv.gz"
    aside = tmp_path / "aside.csv.gz"
    os.rename(path, aside)
    path.mkdir()
    (path / "blocker").write_text("unlink() cannot remove a non-empty directory")
    eventually(lambda: caller.get(job.id).status == pb.Job.EXPIRED, "the job to expire", timeout=15)
    assert not caller.get(job.id).location
    time.sleep(0.6)  # a few more rounds: each delete fails again
    assert server.app.store.get(tenant, job.id).storage_key == f"{tenant}/{job.id}/{tenant}.csv.gz"
    os.rename(path, tmp_path / "blocker-dir")  # two renames: the folder is never empty long enough for a
    os.rename(aside, path)                     # round to delete it (rmtree took long enough, once in a run)
    eventually(lambda: server.app.store.get(tenant, job.id).storage_key is None, "the retried delete", timeout=30)
    # A round that ran between the two lines above found no file and cleared the key; the sweep then
    # deletes the file put back, as it deletes any file of an expired job.
    eventually(lambda: not path.exists(), "the file to be deleted", timeout=30)
    eventually(lambda: not (server.data_dir / "files" / tenant).exists(), "the empty folders to go", timeout=30)
    final = caller.get(job.id)
    assert final.status == pb.Job.EXPIRED and not final.location


def test_sweep_removes_files_of_jobs_that_are_gone_and_keeps_completed_ones(make_server) -> None:
    """A file under a job id that no job has (a purged job, a lost database row) is deleted by the
    sweep, with its folder; a completed job's file beside it stays."""
    server: ServerHandle = make_server(**FAST_SWEEP)
    tenant = new_tenant()
    server.seed(20, tenant=tenant)
    caller = Caller(server, tenant)
    kept = caller.finish(caller.create(format=pb.ExportRequest.CSV).id)
    orphan = server.data_dir / "files" / tenant / "job_AAAAAAAAAAAAAAAA" / f"{tenant}.csv.gz"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"user data nobody knows of")
    eventually(lambda: not orphan.parent.exists(), "the sweep to remove the orphan", timeout=30)
    assert len(download(caller.get(kept.id).location).splitlines()) == 21
