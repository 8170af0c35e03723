"""Files are private: under a permissive umask (022, which made them 0644/0755 before), everything a
server creates in its data directory (database, WAL/SHM, secrets, export files and folders) is
0600 and every folder 0700, because the modes are given where things are created. (LocalStorage's
partial files: tests/storage/test_local.py.)"""
from __future__ import annotations

from collections.abc import Callable

from tests.file_modes import modes, permissive_umask  # noqa: F401  (the fixture)
from tests.harness import ServerHandle
from tests.integration.support import Caller, download
from userexport.v1 import users_export_pb2 as pb


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
