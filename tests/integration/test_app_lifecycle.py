"""The app's life cycle and the job core's housekeeping, against real servers: construction binds and
creates nothing, a failed start leaves nothing behind, a killed attempt's partial file goes when the
job completes, and a page of completed jobs has its URLs signed at once."""
from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import pathlib
import socket
import threading
import time

import pytest

from tests.harness import TEST_DEFAULTS, ServerHandle
from tests.integration.support import Caller
from tests.polling import eventually
from userexport.v1 import users_export_pb2 as pb
from userexport_server.app import App
from userexport_server.settings import ConfigError, Settings
from userexport_server.storage.base import Storage


def bound(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def ours(threads: set[threading.Thread]) -> list[str]:
    """The app's threads among `threads`: not gRPC's completion-queue poller, which lives as long as
    the process once any grpc.aio server was made."""
    return [thread.name for thread in threads if "_poll_wrapper" not in thread.name]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_construction_binds_nothing_and_a_failed_start_closes_what_it_opened(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """App() builds values only: no port bound, no thread started, not even the data folder made.
    A start that fails late (the reaper, after gRPC, downloads and the workers are up) closes the
    ports and threads it opened and raises the error; a port taken before start is one ConfigError
    naming its variable, with nothing bound."""
    ports = {name: free_port() for name in ("listen", "files_listen", "metrics_listen")}
    settings = Settings(**{**TEST_DEFAULTS, "data_dir": tmp_path / "data",
                           **{name: f"127.0.0.1:{port}" for name, port in ports.items()}})
    before = set(threading.enumerate())
    app = App(settings)
    assert not any(bound(port) for port in ports.values())
    assert set(threading.enumerate()) == before
    assert not (tmp_path / "data").exists()

    def broken() -> None:
        raise RuntimeError("the reaper cannot start")

    monkeypatch.setattr(app.reaper, "start", broken)
    with pytest.raises(RuntimeError, match="the reaper cannot start"):
        asyncio.run(app.start())
    assert not any(bound(port) for port in ports.values())
    eventually(lambda: not ours(set(threading.enumerate()) - before), "the started threads ending", timeout=10)

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports["metrics_listen"]))
        taken.listen()
        with pytest.raises(ConfigError, match="USEREXPORT_METRICS_LISTEN"):
            asyncio.run(App(settings).start())
        assert not bound(ports["listen"]) and not bound(ports["files_listen"])


def test_a_killed_attempts_partial_file_goes_when_the_job_completes_and_the_rest_on_delete(
        make_server, tenant: str) -> None:
    """A SIGKILLed attempt leaves `.<part>.tmp-<random>` beside the parts; it used to stay until the
    orphan sweep (up to 10 minutes), even past the job's expiry. Now completion removes everything
    but the file, and DeleteJob (or expiry) the rest."""
    server: ServerHandle = make_server(slice_users=400)
    server.seed(2000, tenant=tenant)
    caller = Caller(server, tenant)
    job = caller.create(format=pb.ExportRequest.CSV)
    folder = server.data_dir / "files" / tenant / job.id
    eventually(folder.is_dir, "the job's folder")
    partial = folder / ".part-00001-1.gz.tmp-killed0"
    partial.write_bytes(b"\x1f\x8b half a gzip member")
    final = caller.finish(job.id)
    assert final.status == pb.Job.COMPLETED
    eventually(lambda: sorted(p.name for p in folder.iterdir()) == [f"{tenant}.csv.gz"],
               "the parts and the partial file deleted after the file was committed")
    caller.stub.DeleteJob(pb.DeleteJobRequest(id=job.id), metadata=caller.metadata)
    assert not folder.exists() or not any(folder.iterdir())


@dataclasses.dataclass
class SlowSigner:
    """The server's own storage, signing as IAM signBlob does: one remote call of `delay` per URL."""

    storage: Storage
    delay: float
    signs_locally = False

    def sign_url(self, key: str, ttl_seconds: int) -> tuple[str, dt.datetime]:
        time.sleep(self.delay)
        return self.storage.sign_url(key, ttl_seconds)


@pytest.mark.parametrize("backend", ["sqlite"])  # signing is the storage's, whatever the database
def test_a_page_of_completed_jobs_is_signed_at_once_not_one_after_another(make_server, tenant: str) -> None:
    """ListJobs used to sign each completed job's URL in turn: 1,000 sequential signBlob calls for a
    page under IAM signing. With 0.3 s a signature, 8 jobs now take about one signature's time."""
    server: ServerHandle = make_server(max_active_jobs_per_tenant=8, api_read_threads=8)
    server.seed(10, tenant=tenant)
    caller = Caller(server, tenant)
    jobs = [caller.create(format=pb.ExportRequest.CSV) for _ in range(8)]
    for job in jobs:
        assert caller.finish(job.id).status == pb.Job.COMPLETED
    assert server.app.servicer is not None
    server.app.servicer.storage = SlowSigner(server.app.storage, 0.3)
    started = time.monotonic()
    listed = caller.list(page_size=8)
    took = time.monotonic() - started
    assert len(listed.jobs) == 8 and all(job.location for job in listed.jobs)
    assert took < 8 * 0.3 / 2, f"ListJobs took {took:.2f} s for 8 signatures of 0.3 s"
