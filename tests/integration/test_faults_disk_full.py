"""The local storage folder fills up, for real: a small tmpfs mounted on it (as root; skipped where
mounting is not allowed), filled by a ballast file, first so that a slice's part does not fit, then
so that the parts fit but the joined file does not. Each time the export FAILS with a message that
says the storage disk is full, no partial file or part is left, the server serves on, and once the
ballast is deleted the same export completes whole.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import subprocess
from collections.abc import Iterator

import pytest

from tests.databases import database_settings
from tests.harness import ServerHandle, new_tenant
from tests.integration.support import Caller, download
from tests.polling import eventually
from userexport.v1 import users_export_pb2 as pb

USERS = 30_000
DISK = 16 * 1024 * 1024  # room for a few exports of USERS (each needs twice its file while its parts are joined)
ROOM = 64 * 1024  # far less than a slice's part


@contextlib.contextmanager
def tmpfs(path: pathlib.Path, size: int) -> Iterator[pathlib.Path]:
    """A tmpfs of `size` bytes mounted on `path` until the block ends; skips the test where the
    machine does not let us mount one."""
    path.mkdir(parents=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def files_under(root: pathlib.Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file())


def fill(folder: pathlib.Path, leave: int) -> pathlib.Path:
    """A ballast file that leaves `leave` bytes free on `folder`'s disk."""
    disk = os.statvfs(folder)
    ballast = folder / "ballast"
    ballast.write_bytes(b"\0" * (disk.f_bavail * disk.f_frsize - leave))
    return ballast


def test_a_full_disk_fails_the_export_cleanly_and_exports_work_once_space_is_freed(
        backend: str, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    """Full while a slice writes its part, then full only when the parts are joined into the file:
    each time the job FAILS naming the full disk, and nothing it wrote is left."""
    data = tmp_path / "data"
    with database_settings(backend) as database, tmpfs(data / "files", DISK) as files:
        server = ServerHandle(data, **database, slice_users=USERS // 3, job_attempts=2, reaper_interval_seconds=0.2)
        try:
            tenant = new_tenant()
            server.seed(USERS, tenant=tenant)
            caller = Caller(server, tenant)

            def export() -> pb.Job:
                return caller.finish(caller.create(format=pb.ExportRequest.JSON).id)

            first = export()
            assert first.status == pb.Job.COMPLETED, first.error
            kept = f"{tenant}/{first.id}/{tenant}.json.gz"
            eventually(lambda: files_under(files) == [kept], "the first export's parts deleted")
            for leave in (ROOM, first.size_bytes * 3 // 2):  # no room for a part; room for the parts only
                ballast = fill(files, leave)
                failed = export()
                assert failed.status == pb.Job.FAILED
                assert "the storage disk is full" in failed.error and "No space left on device" in failed.error, \
                    failed.error
                eventually(lambda: files_under(files) == ["ballast", kept], "the parts and partial files deleted")
                assert caller.get(first.id).status == pb.Job.COMPLETED  # the server serves on
                ballast.unlink()
            assert "local storage failed action=appending" in caplog.text, "the joined file never ran out of room"
            done = export()
            assert done.status == pb.Job.COMPLETED, done.error
            assert len(download(done.location).splitlines()) == done.users_written == USERS
        finally:
            server.stop()
