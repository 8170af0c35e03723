"""Job life cycle on a real server: cancel, many watchers, disconnecting watchers, signed URLs."""
from __future__ import annotations

import itertools
import threading
import time
import urllib.parse

import grpc
import pytest

from tests.harness import ServerHandle, new_tenant
from tests.integration.support import Caller, download, http_status
from tests.polling import eventually
from userexport.v1 import users_export_pb2 as pb

BIG = 200_000


@pytest.fixture(scope="module")
def big_tenant(server: ServerHandle) -> str:
    """Enough users that an export runs for a while, to act on it mid-way."""
    tenant = new_tenant()
    server.seed(BIG, tenant=tenant)
    return tenant


def files_of(server: ServerHandle, job_id: str) -> list[str]:
    return [str(p) for p in (server.data_dir / "files").rglob("*") if job_id in str(p) and p.is_file()]


def wait_for_status(caller: Caller, job_id: str, status: int) -> pb.Job:
    for message in caller.stub.WatchJob(pb.WatchJobRequest(id=job_id), metadata=caller.metadata, timeout=60):
        if message.status == status:
            return message
    raise AssertionError(f"job {job_id} never reached {pb.Job.Status.Name(status)}")


def test_cancel_pending_job(make_server) -> None:
    idle = make_server(workers=0)  # nobody claims: the job stays pending
    tenant = new_tenant()
    idle.seed(10, tenant=tenant)
    caller = Caller(idle, tenant)
    job = caller.create(format=pb.ExportRequest.CSV)
    cancelled = caller.cancel(job.id)
    assert cancelled.status == pb.Job.CANCELLED and not cancelled.location
    assert caller.cancel(job.id).status == pb.Job.CANCELLED  # idempotent
    assert caller.watch(job.id)[-1].status == pb.Job.CANCELLED  # a watcher of a finished job ends at once


def test_cancel_running_export_stops_and_leaves_no_file(server: ServerHandle, big_tenant: str) -> None:
    caller = Caller(server, big_tenant)
    job = caller.create(format=pb.ExportRequest.JSON)
    messages: list[pb.Job] = []
    watcher = threading.Thread(target=lambda: messages.extend(caller.watch(job.id)))
    watcher.start()
    wait_for_status(caller, job.id, pb.Job.PROCESSING)
    cancelled_at = time.monotonic()
    assert caller.cancel(job.id).status == pb.Job.CANCELLED
    watcher.join(30)
    assert messages[-1].status == pb.Job.CANCELLED
    eventually(lambda: job.id not in server.app.workers.running(), "the export stopping", timeout=10, every=0.02)
    assert job.id not in server.app.workers.running()
    assert time.monotonic() - cancelled_at < 5, "a running export stops promptly"
    assert files_of(server, job.id) == []
    final = caller.get(job.id)
    assert final.status == pb.Job.CANCELLED and not final.location
    with pytest.raises(grpc.RpcError) as error:
        caller.cancel(caller.finish(caller.create(format=pb.ExportRequest.CSV, limit=1).id).id)
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # a completed job cannot be cancelled


def test_many_watchers_see_every_transition(server: ServerHandle, big_tenant: str) -> None:
    caller = Caller(server, big_tenant)
    job = caller.create(format=pb.ExportRequest.CSV, limit=100_000)
    streams: list[list[pb.Job]] = [[] for _ in range(6)]
    threads = [threading.Thread(target=lambda s=s: s.extend(caller.watch(job.id))) for s in streams]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for stream in streams:
        assert stream[-1].status == pb.Job.COMPLETED and stream[-1].location
        statuses = [m.status for m in stream]
        assert pb.Job.PROCESSING in statuses
        progress = [m.percentage_done for m in stream]
        assert progress == sorted(progress)
        written = [m.users_written for m in stream if m.status == pb.Job.PROCESSING]
        assert written == sorted(written)
    # Every watcher saw the same transitions after the point where the last one joined.
    tails = [[(m.status, m.users_written) for m in s if m.updated_at.ToDatetime() >= max(
        t[0].updated_at.ToDatetime() for t in streams)] for s in streams]
    assert all(tail == tails[0] for tail in tails)
    assert server.app.bus.watcher_count(job.id) == 0


def test_progress_is_reported_in_steps_that_never_go_back(server: ServerHandle, big_tenant: str) -> None:
    """Progress comes per 1% but at most four times a second per slice (every message goes to every
    watcher), so a fast export skips percentages; it never goes back, and the last one is whole."""
    caller = Caller(server, big_tenant)
    job = caller.create(format=pb.ExportRequest.CSV)
    stream = caller.watch(job.id)
    processing = [m for m in stream if m.status == pb.Job.PROCESSING and m.users_total]
    steps = [b.percentage_done - a.percentage_done for a, b in itertools.pairwise(processing)]
    assert processing and min(steps, default=0) >= 0, steps
    assert any(m.HasField("time_left_seconds") for m in processing)
    assert stream[-1].users_written == BIG


def test_disconnecting_watcher_frees_its_subscription(make_server) -> None:
    idle = make_server(workers=0)
    tenant = new_tenant()
    idle.seed(5, tenant=tenant)
    caller = Caller(idle, tenant)
    job = caller.create(format=pb.ExportRequest.CSV)
    call = caller.stub.WatchJob(pb.WatchJobRequest(id=job.id), metadata=caller.metadata)
    assert next(call).status == pb.Job.PENDING
    assert idle.app.bus.watcher_count(job.id) == 1
    call.cancel()
    eventually(lambda: not idle.app.bus.watcher_count(job.id), "the watcher going", timeout=5, every=0.02)
    assert idle.app.bus.watcher_count(job.id) == 0


def test_tampered_and_expired_urls_are_refused(make_server) -> None:
    short = make_server(url_ttl_seconds=1)
    tenant = new_tenant()
    short.seed(20, tenant=tenant)
    caller = Caller(short, tenant)
    job = caller.finish(caller.create(format=pb.ExportRequest.CSV).id)
    assert download(job.location)
    parts = urllib.parse.urlsplit(job.location)
    query = dict(urllib.parse.parse_qsl(parts.query))
    forged_signature = {**query, "signature": ("0" if query["signature"][0] != "0" else "1") + query["signature"][1:]}
    assert http_status(parts._replace(query=urllib.parse.urlencode(forged_signature)).geturl()) == 403
    longer = {**query, "expires": str(int(query["expires"]) + 3600)}
    assert http_status(parts._replace(query=urllib.parse.urlencode(longer)).geturl()) == 403
    other_path = parts._replace(path=parts.path.replace(tenant, "someone-else")).geturl()
    assert http_status(other_path) == 403
    time.sleep(2.1)
    assert http_status(job.location) == 403
    assert http_status(caller.get(job.id).location) == 200  # a fresh signature works again
