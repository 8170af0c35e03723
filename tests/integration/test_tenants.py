"""Two tenants side by side: neither can reach the other's jobs, users, connections or files."""
from __future__ import annotations

import concurrent.futures
import csv
import io
import time
import urllib.parse

import grpc
import pytest

from tests.harness import ServerHandle, new_tenant
from tests.integration.support import Caller, download, error_reason, http_status, violations
from tests.polling import eventually
from userexport.v1 import users_export_pb2 as pb


@pytest.fixture
def pair(server: ServerHandle):
    a, b = new_tenant(), new_tenant()
    connections_a = server.seed(30, tenant=a, seed=1)
    connections_b = server.seed(40, tenant=b, seed=2)
    return (Caller(server, a), connections_a), (Caller(server, b), connections_b)


def test_tenants_cannot_reach_each_others_jobs(pair) -> None:
    (alice, _), (bob, _) = pair
    job = alice.finish(alice.create(format=pb.ExportRequest.CSV).id)
    for attempt in (bob.get, bob.cancel, bob.watch):
        with pytest.raises(grpc.RpcError) as error:
            attempt(job.id)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND  # not PERMISSION_DENIED: no existence oracle
    assert [j.id for j in bob.list().jobs] == []
    assert [j.id for j in alice.list().jobs] == [job.id]
    assert alice.get(job.id).status == pb.Job.COMPLETED  # bob's cancel did nothing


def test_exports_only_contain_the_callers_users(pair) -> None:
    (_alice, _), (bob, _) = pair
    lines = download(bob.finish(bob.create(format=pb.ExportRequest.JSON).id).location).splitlines()
    assert len(lines) == 40


def test_another_tenants_connection_does_not_exist(pair) -> None:
    (_alice, connections_a), (bob, _) = pair
    with pytest.raises(grpc.RpcError) as error:
        bob.create(format=pb.ExportRequest.CSV, connection_id=connections_a[0])
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(error.value) == {"connection_id": "The connection does not exist."}


def test_signed_url_of_one_tenant_cannot_be_bent_to_another(pair) -> None:
    (alice, _), (bob, _) = pair
    job_a = alice.finish(alice.create(format=pb.ExportRequest.CSV).id)
    job_b = bob.finish(bob.create(format=pb.ExportRequest.CSV).id)
    url_a, url_b = urllib.parse.urlsplit(job_a.location), urllib.parse.urlsplit(job_b.location)
    # Bob's signature on alice's path: refused.
    assert http_status(url_a._replace(query=url_b.query).geturl()) == 403
    assert http_status(job_a.location) == 200


def test_page_tokens_cannot_cross_tenants(pair) -> None:
    (alice, _), (bob, _) = pair
    for _ in range(2):
        alice.finish(alice.create(format=pb.ExportRequest.CSV, limit=1).id)
    page = alice.list(page_size=1)
    assert page.next_page_token
    with pytest.raises(grpc.RpcError) as error:
        bob.list(page_size=1, page_token=page.next_page_token)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(error.value) == "INVALID_PAGE_TOKEN"
    with pytest.raises(grpc.RpcError):
        alice.list(page_token=page.next_page_token[:-2] + "AA")


def test_watcher_never_sees_another_tenants_events(pair) -> None:
    (alice, _), (bob, _) = pair
    job = alice.create(format=pb.ExportRequest.CSV)
    with pytest.raises(grpc.RpcError) as error:
        bob.watch(job.id)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    alice.finish(job.id)


def test_per_tenant_limit_holds_under_20_concurrent_creates(make_server) -> None:
    idle = make_server(workers=0)  # jobs stay pending, so each counts against the limit
    tenant, other = new_tenant(), new_tenant()
    idle.seed(5, tenant=tenant)
    idle.seed(5, tenant=other)
    callers = [Caller(idle, tenant) for _ in range(20)]

    def create(caller: Caller) -> str:
        try:
            caller.create(format=pb.ExportRequest.CSV)
            return "OK"
        except grpc.RpcError as error:
            assert "at most 2" in error.details()
            assert error_reason(error) == "TOO_MANY_ACTIVE_JOBS"
            return error.code().name

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        outcomes = list(pool.map(create, callers))
    assert outcomes.count("OK") == 2 and outcomes.count("RESOURCE_EXHAUSTED") == 18
    assert len(callers[0].list().jobs) == 2
    assert Caller(idle, other).create(format=pb.ExportRequest.CSV).status == pb.Job.PENDING  # per tenant
    callers[0].cancel(callers[0].list().jobs[0].id)
    assert callers[0].create(format=pb.ExportRequest.JSON).status == pb.Job.PENDING  # a slot freed


def test_idempotent_create_under_concurrent_repeats(make_server) -> None:
    idle = make_server(workers=0)
    tenant = new_tenant()
    idle.seed(5, tenant=tenant)
    request_id = "5f0c6b1e-3d4a-4e8b-9a51-2f1d7c9e0b42"

    def create(_: int) -> str:
        return Caller(idle, tenant).create(format=pb.ExportRequest.CSV, limit=3, request_id=request_id).id

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        ids = set(pool.map(create, range(10)))
    assert len(ids) == 1
    caller = Caller(idle, tenant)
    assert len(caller.list().jobs) == 1
    with pytest.raises(grpc.RpcError) as error:
        caller.create(format=pb.ExportRequest.CSV, limit=4, request_id=request_id)
    assert error.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_reason(error.value) == "REQUEST_ID_REUSED"
    # The same key in another tenant is another request.
    other = new_tenant()
    idle.seed(1, tenant=other)
    assert Caller(idle, other).create(format=pb.ExportRequest.CSV, limit=3, request_id=request_id).id not in ids


def test_list_paginates_and_filters(make_server) -> None:
    idle = make_server(workers=0, max_active_jobs_per_tenant=100)
    tenant = new_tenant()
    idle.seed(2, tenant=tenant)
    caller = Caller(idle, tenant)
    created = [caller.create(format=pb.ExportRequest.CSV).id for _ in range(7)]
    caller.cancel(created[0])
    seen, token, pages = [], "", 0
    while True:
        page = caller.list(page_size=3, page_token=token)
        seen += [j.id for j in page.jobs]
        pages += 1
        token = page.next_page_token
        if not token:
            break
        assert len(page.jobs) == 3  # an empty token only at the end
    assert seen == list(reversed(created)) and pages == 3
    assert [j.id for j in caller.list(status=pb.Job.CANCELLED).jobs] == [created[0]]
    assert len(caller.list(status=pb.Job.PENDING).jobs) == 6
    assert len(caller.list(page_size=100_000).jobs) == 7  # coerced to the maximum, not refused
    with pytest.raises(grpc.RpcError) as error:
        caller.list(page_size=-1)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_completed_job_expires_and_its_file_is_deleted(make_server) -> None:
    short = make_server(job_ttl_seconds=3, reaper_interval_seconds=0.2)
    tenant = new_tenant()
    short.seed(10, tenant=tenant)
    caller = Caller(short, tenant)
    job = caller.create(format=pb.ExportRequest.CSV)
    stream = caller.stub.WatchJob(pb.WatchJobRequest(id=job.id), metadata=caller.metadata, timeout=30)
    first_completed = next(m for m in stream if m.status == pb.Job.COMPLETED)
    key_files = [p for p in (short.data_dir / "files").rglob("*") if p.is_file()]
    assert key_files and first_completed.location
    eventually(lambda: caller.get(job.id).status == pb.Job.EXPIRED, "the job expiring", timeout=10, every=0.1)
    expired = caller.get(job.id)
    assert expired.status == pb.Job.EXPIRED and not expired.location
    assert not [p for p in (short.data_dir / "files").rglob("*") if p.is_file()], "the file is deleted"
    assert http_status(first_completed.location) in (403, 404)
    assert caller.watch(job.id)[-1].status == pb.Job.EXPIRED


def test_pending_job_expires_and_its_watchers_are_told(make_server) -> None:
    short = make_server(workers=0, job_ttl_seconds=2, reaper_interval_seconds=0.2)
    tenant = new_tenant()
    short.seed(3, tenant=tenant)
    caller = Caller(short, tenant)
    job = caller.create(format=pb.ExportRequest.CSV)
    started = time.monotonic()
    messages = caller.watch(job.id, timeout=30)
    assert [m.status for m in messages] == [pb.Job.PENDING, pb.Job.EXPIRED]
    assert 1.5 < time.monotonic() - started < 10


def test_timeout_fails_a_long_export_and_discards_its_output(make_server) -> None:
    slow = make_server(job_timeout_seconds=0.3, reaper_interval_seconds=0.1, gzip_level=9)
    tenant = new_tenant()
    slow.seed(150_000, tenant=tenant)
    caller = Caller(slow, tenant)
    job = caller.create(format=pb.ExportRequest.JSON)
    final = caller.finish(job.id)
    assert final.status == pb.Job.FAILED and "Timed out" in final.error and not final.location
    eventually(lambda: job.id not in slow.app.workers.running(), "the export stopping", timeout=10)
    assert not [p for p in (slow.data_dir / "files").rglob("*") if p.is_file()]


def test_reaper_runs_safely_alongside_exports(make_server) -> None:
    busy = make_server(reaper_interval_seconds=0.05, job_ttl_seconds=3600, max_active_jobs_per_tenant=10)
    tenant = new_tenant()
    busy.seed(20_000, tenant=tenant)
    caller = Caller(busy, tenant)
    jobs = [caller.create(format=f, limit=n) for f, n in
            [(pb.ExportRequest.CSV, 20_000), (pb.ExportRequest.JSON, 15_000), (pb.ExportRequest.CSV, 5)]]
    for job in jobs:
        final = caller.finish(job.id)
        assert final.status == pb.Job.COMPLETED
        body = download(final.location).decode()
        records = list(csv.reader(io.StringIO(body, newline="")))[1:] if final.format == pb.ExportRequest.CSV \
            else body.splitlines()  # NDJSON escapes newlines inside values; CSV quotes them
        assert len(records) == final.users_written == job.limit
