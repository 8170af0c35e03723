"""DeleteJob revokes a file before its expiry; a per-tenant quota bounds the bytes of files kept."""
from __future__ import annotations

import threading

import grpc
import pytest
from google.rpc import error_details_pb2

from tests.harness import ServerHandle, new_tenant
from tests.integration.support import Caller, detail, error_reason, http_status, violations
from tests.polling import eventually
from userexport.v1 import users_export_pb2 as pb


def export_files(server: ServerHandle, job_id: str) -> list[str]:
    return [p.name for p in (server.data_dir / "files").rglob("*") if job_id in str(p) and p.is_file()]


def delete(caller: Caller, job_id: str) -> pb.Job:
    return caller.stub.DeleteJob(pb.DeleteJobRequest(id=job_id), metadata=caller.metadata)


def test_delete_removes_the_file_at_once_and_the_job_reads_expired(server: ServerHandle, tenant: str) -> None:
    server.seed(30, tenant=tenant)
    caller = Caller(server, tenant)
    done = caller.finish(caller.create(format=pb.ExportRequest.CSV).id)
    assert done.status == pb.Job.COMPLETED and done.size_bytes > 0
    (path,) = [p for p in (server.data_dir / "files").rglob("*.gz") if done.id in str(p)]
    assert path.stat().st_size == done.size_bytes  # the size the quota counts is the file's

    deleted = delete(caller, done.id)
    assert deleted.status == pb.Job.EXPIRED and not deleted.location and deleted.size_bytes == 0
    # It expired when it was deleted, not 24 hours after its creation (an expired job with a future
    # expires_at reads as a contradiction).
    assert done.finished_at.ToDatetime() <= deleted.expires_at.ToDatetime() <= deleted.updated_at.ToDatetime()
    assert not export_files(server, done.id)  # gone now, not at the next reaper round
    assert http_status(done.location) == 404  # a URL signed before the delete finds nothing
    assert caller.get(done.id).status == pb.Job.EXPIRED and not caller.get(done.id).location
    assert delete(caller, done.id).status == pb.Job.EXPIRED  # deleting again answers the same


def test_delete_is_refused_for_strangers_and_bad_ids(server: ServerHandle, tenant: str) -> None:
    server.seed(5, tenant=tenant)
    caller = Caller(server, tenant)
    job = caller.finish(caller.create(format=pb.ExportRequest.JSON).id)
    stranger = Caller(server, new_tenant())
    with pytest.raises(grpc.RpcError) as error:
        delete(stranger, job.id)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND  # another tenant's job does not exist for it
    with pytest.raises(grpc.RpcError) as error:
        delete(caller, "../" + job.id)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and set(violations(error.value)) == {"id"}
    with pytest.raises(grpc.RpcError) as error:
        delete(Caller(server, tenant, scopes=("create:users",)), job.id)
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED  # deleting needs read:users, like cancel
    assert caller.get(job.id).status == pb.Job.COMPLETED  # nothing was deleted by the refused calls
    assert export_files(server, job.id)


def test_deleting_a_running_export_stops_it_and_leaves_no_file(server: ServerHandle, tenant: str) -> None:
    server.seed(100_000, tenant=tenant)
    caller = Caller(server, tenant)
    job = caller.create(format=pb.ExportRequest.JSON)
    watching = caller.stub.WatchJob(pb.WatchJobRequest(id=job.id), metadata=caller.metadata, timeout=60)
    for message in watching:
        if message.status == pb.Job.PROCESSING:
            break
    assert delete(caller, job.id).status == pb.Job.EXPIRED
    assert list(watching)[-1].status == pb.Job.EXPIRED  # the watcher hears of it, and its stream ends
    eventually(lambda: job.id not in ",".join(server.app.workers.running()), "the export stopping", timeout=30)
    assert job.id not in server.app.workers.running()
    assert not export_files(server, job.id)  # neither the partial nor a finished file
    assert caller.get(job.id).status == pb.Job.EXPIRED


def test_retained_bytes_quota_refuses_new_exports_until_a_file_is_deleted(make_server) -> None:
    server = make_server(max_retained_bytes_per_tenant=1)
    tenant, other = new_tenant(), new_tenant()
    server.seed(10, tenant=tenant)
    server.seed(10, tenant=other)
    caller = Caller(server, tenant)
    first = caller.finish(caller.create(format=pb.ExportRequest.CSV).id)
    assert first.status == pb.Job.COMPLETED

    with pytest.raises(grpc.RpcError) as error:
        caller.create(format=pb.ExportRequest.CSV)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_reason(error.value) == "RETAINED_BYTES_QUOTA_EXCEEDED"
    failure = detail(error.value, error_details_pb2.QuotaFailure)
    assert failure is not None and failure.violations[0].subject == f"tenant:{tenant}"
    assert f"{first.size_bytes} of 1" in failure.violations[0].description
    info = detail(error.value, error_details_pb2.ErrorInfo)
    assert info is not None and dict(info.metadata) == {"limit_bytes": "1", "retained_bytes": str(first.size_bytes)}
    assert len(caller.list().jobs) == 1  # the refused create made no job

    other_caller = Caller(server, other)  # the quota is per tenant
    assert other_caller.finish(other_caller.create(format=pb.ExportRequest.CSV).id).status == pb.Job.COMPLETED

    delete(caller, first.id)
    assert caller.finish(caller.create(format=pb.ExportRequest.CSV).id).status == pb.Job.COMPLETED


def test_many_concurrent_deletes_of_one_job_agree(server: ServerHandle, tenant: str) -> None:
    server.seed(5, tenant=tenant)
    caller = Caller(server, tenant)
    job = caller.finish(caller.create(format=pb.ExportRequest.CSV).id)
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(delete(caller, job.id).status)) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == [pb.Job.EXPIRED] * 6
    assert not export_files(server, job.id)
