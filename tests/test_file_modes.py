"""Files are private: under a permissive umask (022, which made them 0644/0755 before), everything a
server creates in its data directory (database, WAL/SHM, secrets, export files and folders) is
0600 and every folder 0700, because the modes are given where things are created."""
from __future__ import annotations

import os
import pathlib
import stat
from collections.abc import Callable, Iterator

import pytest

from tests.harness import ServerHandle
from tests.integration.support import Caller, download
from userexport.v1 import users_export_pb2 as pb
from userexport_server.storage.local import LocalStorage


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def modes(root: pathlib.Path) -> dict[str, str]:
    found = {".": oct(stat.S_IMODE(root.stat().st_mode))}
    found.update({str(p.relative_to(root)): oct(stat.S_IMODE(p.lstat().st_mode)) for p in root.rglob("*")})
    return found


def test_everything_a_server_creates_is_private(permissive_umask: None, make_server: Callable[..., ServerHandle],
                                                tenant: str, backend: str) -> None:
    server = make_server()
    server.seed(50, tenant=tenant)
    caller = Caller(server, tenant)
    final = caller.finish(caller.create(format=pb.ExportRequest.CSV).id)
    assert final.status == pb.Job.COMPLETED
    assert len(download(final.location).splitlines()) == 51

    found = modes(server.data_dir)
    expected_files = {"jwt_secret", "page_token_key", "url_signing_key",
                      f"files/{tenant}/{final.id}/{tenant}.csv.gz"}
    if backend == "sqlite":
        expected_files |= {"userexport.db", "userexport.db-wal", "userexport.db-shm"}
    assert expected_files <= set(found), found
    wrong = {path: mode for path, mode in found.items()
             if mode != ("0o700" if (server.data_dir / path).is_dir() else "0o600")}
    assert not wrong, wrong


def test_a_partial_export_file_and_its_folders_are_private(permissive_umask: None, tmp_path: pathlib.Path) -> None:
    storage = LocalStorage(tmp_path / "files", b"secret", listen="127.0.0.1:0")
    try:
        storage.start()
        writer = storage.open_writer("acme/job_0123456789abcdef/acme.csv.gz", "acme.csv.gz")
        writer.write(b"partial")
        found = modes(tmp_path / "files")
        assert [p for p in found if ".tmp-" in p], found
        assert set(found.values()) == {"0o700", "0o600"}, found
        assert {p for p, m in found.items() if m == "0o600"} == {p for p in found if ".tmp-" in p}
        writer.abort()
    finally:
        storage.close()
