"""The Prometheus endpoint of a real server, scraped over HTTP: every RPC counted once with its final
code (unary, streaming, aborted, cancelled, out of time), the export's rows, bytes and durations,
jobs by status from the database, watchers, health checks and (PostgreSQL) the event feed's lag;
the text passes `promtool check metrics`, and a database that is down or hangs never fails a scrape."""
from __future__ import annotations

import subprocess
from collections.abc import Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.harness import ServerHandle
from tests.integration.pg_faults import connections_refused, terminate_all
from tests.integration.support import Caller
from tests.polling import eventually
from tests.test_metrics import Samples, by_label, one, parse, scrape
from tests.tools import required_tool
from userexport.v1 import users_export_pb2 as pb
from userexport_server.jobs.model import JobStatus

SERVICE = "userexport.v1.UsersExportService"
HEALTH = "grpc.health.v1.Health"
MISSING_JOB = "job_" + "A" * 16


def rpcs(samples: Samples) -> dict[tuple[str, str, str], float]:
    return {(labels_["service"], labels_["method"], labels_["code"]): value for (name, labels), value in samples.items()
            if name == "userexport_rpcs_total" for labels_ in (dict(labels),)}


def promtool_check(text: str) -> None:
    promtool = required_tool("promtool", "apt-get install prometheus")
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), \
        result.stdout + result.stderr


def settled(server: ServerHandle, done: Callable[[Samples], bool]) -> tuple[str, Samples]:
    """The scrape once `done` says so: a call's server side finishes just after its client sees the end."""
    def probe() -> tuple[str, Samples] | None:
        text = scrape(server.metrics_port)
        samples = parse(text)
        return (text, samples) if done(samples) else None
    return eventually(probe, "the metrics settling", timeout=10)


def test_calls_exports_and_jobs_are_counted_exactly(make_server: Callable[..., ServerHandle], tenant: str) -> None:
    server = make_server(slice_users=100)
    server.seed(250, tenant=tenant)
    caller = Caller(server, tenant)
    health = health_pb2_grpc.HealthStub(caller.channel)
    try:
        final = caller.finish(caller.create(format=pb.ExportRequest.CSV).id)
        assert final.status == pb.Job.COMPLETED and final.size_bytes > 0
        for call in (lambda: caller.get(MISSING_JOB), lambda: caller.watch(MISSING_JOB)):
            with pytest.raises(grpc.RpcError) as refused:
                call()
            assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as late:
            list(health.Watch(health_pb2.HealthCheckRequest(), timeout=0.3))
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        stream = health.Watch(health_pb2.HealthCheckRequest())
        assert next(stream).status == health_pb2.HealthCheckResponse.SERVING
        stream.cancel()
    finally:
        caller.close()

    expected = {(SERVICE, "CreateUsersExportJob", "OK"): 1, (SERVICE, "WatchJob", "OK"): 1,
                (SERVICE, "GetJob", "NOT_FOUND"): 1, (SERVICE, "WatchJob", "NOT_FOUND"): 1,
                (HEALTH, "Watch", "DEADLINE_EXCEEDED"): 1, (HEALTH, "Watch", "CANCELLED"): 1}
    text, samples = settled(server, lambda s: rpcs(s) == expected
                      and one(s, "userexport_export_duration_seconds_count") == 1)
    durations = {(labels_["service"], labels_["method"]): value for (name, labels), value in samples.items()
                 if name == "userexport_rpc_duration_seconds_count" for labels_ in (dict(labels),)}
    assert durations == {(SERVICE, "CreateUsersExportJob"): 1, (SERVICE, "WatchJob"): 2, (SERVICE, "GetJob"): 1,
                         (HEALTH, "Watch"): 2}
    assert one(samples, "userexport_export_rows_total") == 250
    assert one(samples, "userexport_export_bytes_total") == final.size_bytes
    assert one(samples, "userexport_export_slice_duration_seconds_count") == 3  # 250 users, 100 a slice
    assert one(samples, "userexport_export_slices_in_flight") == 0
    assert by_label(samples, "userexport_jobs", "status") == {
        status.value: float(status == JobStatus.COMPLETED) for status in JobStatus}
    assert one(samples, "userexport_watchers") == 0
    assert by_label(samples, "userexport_health_check_healthy", "check") == {
        "workers": 1, "database": 1, "events": 1, "downloads": 1}
    promtool_check(text)


def test_watchers_and_pending_jobs_are_seen_while_they_last(make_server: Callable[..., ServerHandle],
                                                            tenant: str) -> None:
    server = make_server(workers=0)  # nothing runs the job: it stays pending until cancelled
    caller = Caller(server, tenant)
    try:
        job = caller.create(format=pb.ExportRequest.JSON)
        stream = caller.stub.WatchJob(pb.WatchJobRequest(id=job.id), metadata=caller.metadata, timeout=30)
        assert next(stream).status == pb.Job.PENDING
        samples = parse(scrape(server.metrics_port))
        assert one(samples, "userexport_watchers") == 1
        assert by_label(samples, "userexport_jobs", "status")["pending"] == 1
        caller.cancel(job.id)
        assert [message.status for message in stream] == [pb.Job.CANCELLED]
    finally:
        caller.close()
    _, samples = settled(server, lambda s: one(s, "userexport_watchers") == 0
                      and (SERVICE, "WatchJob", "OK") in rpcs(s))
    assert by_label(samples, "userexport_jobs", "status")["cancelled"] == 1
    assert rpcs(samples) == {(SERVICE, "CreateUsersExportJob", "OK"): 1, (SERVICE, "WatchJob", "OK"): 1,
                             (SERVICE, "CancelJob", "OK"): 1}


def test_event_lag_is_measured_where_another_replica_s_change_arrives(
        make_server: Callable[..., ServerHandle], backend: str, tenant: str) -> None:
    if backend != "postgresql":
        pytest.skip("the event feed across replicas is PostgreSQL's")
    runner = make_server()
    watcher_side = make_server(workers=0, database_url=runner.settings.database_url)
    runner.seed(300, tenant=tenant)
    caller = Caller(watcher_side, tenant)
    try:
        assert caller.finish(caller.create(format=pb.ExportRequest.CSV).id).status == pb.Job.COMPLETED
    finally:
        caller.close()
    lag = parse(scrape(watcher_side.metrics_port))
    delivered = one(lag, "userexport_event_lag_seconds_count")
    assert delivered >= 1  # at least the completion, announced by the runner
    assert 0 <= one(lag, "userexport_event_lag_seconds_sum") / delivered < 5
    assert one(parse(scrape(runner.metrics_port)), "userexport_event_lag_seconds_count") == 0  # nobody watched there


def test_a_scrape_answers_while_postgresql_refuses_connections(make_server: Callable[..., ServerHandle],
                                                               backend: str, tenant: str) -> None:
    if backend != "postgresql":
        pytest.skip("refusing connections is a PostgreSQL fault")
    server = make_server(workers=0, health_interval_seconds=0.2)
    url = server.settings.database_url
    caller = Caller(server, tenant)
    try:
        caller.create(format=pb.ExportRequest.CSV)
    finally:
        caller.close()
    with connections_refused(url):
        terminate_all(url)
        _, samples = settled(server, lambda s: one(s, "userexport_health_check_healthy", check="database") == 0)
        assert not by_label(samples, "userexport_jobs", "status")
        assert one(samples, "userexport_health_check_healthy", check="events") == 0
    _, samples = settled(server, lambda s: bool(by_label(s, "userexport_jobs", "status")))
    assert by_label(samples, "userexport_jobs", "status")["pending"] == 1
