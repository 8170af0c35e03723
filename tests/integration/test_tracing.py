"""Traces on a real server: the RPC's span continues the caller's traceparent, an export's spans are
children of its creation span and carry the job's id, and tracing off builds no provider or interceptor."""
from __future__ import annotations

import io
import json
import logging
import pathlib
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.harness import ServerHandle, new_tenant
from tests.integration.support import Caller
from tests.polling import eventually
from tests.test_tracing import attribute
from userexport.v1 import users_export_pb2 as pb
from userexport.v1 import users_export_pb2_grpc as pb_grpc
from userexport_server.jobs import phases
from userexport_server.jobs.failures import FAILED_INTERNALLY
from userexport_server.logs import JsonFormatter
from userexport_server.tracing import JOB_ID

CREATE = "userexport.v1.UsersExportService/CreateUsersExportJob"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerHandle, InMemorySpanExporter]]:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    # Slices of 200 users: a 500-user export is 3 slices and an assembly of their parts.
    server = ServerHandle(tmp_path_factory.mktemp("traced"), tracer_provider=provider, slice_users=200)
    yield server, spans
    server.stop()


def named(spans: InMemorySpanExporter, name: str, job_id: str | None = None) -> list[ReadableSpan]:
    return [s for s in spans.get_finished_spans()
            if s.name == name and (job_id is None or (s.attributes or {}).get(JOB_ID) == job_id)]


def test_an_export_is_one_trace_from_the_rpc_to_completed(traced: tuple[ServerHandle, InMemorySpanExporter]) -> None:
    server, spans = traced
    tenant = new_tenant()
    server.seed(500, tenant=tenant)
    caller = Caller(server, tenant)
    out, store_log = io.StringIO(), logging.getLogger("userexport_server.jobs.store")
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())  # formats as the line is logged, in the span current then
    store_log.addHandler(handler)
    store_log.setLevel(logging.INFO)
    try:
        job = caller.create(format=pb.ExportRequest.CSV, fields=[("user_id", "")])
        assert caller.finish(job.id).status == pb.Job.COMPLETED
    finally:
        store_log.removeHandler(handler)
        store_log.setLevel(logging.NOTSET)
        caller.close()
    eventually(lambda: named(spans, "export.completed", job.id), "the completed span")

    created, = named(spans, "export.created", job.id)
    rpc, = [s for s in named(spans, CREATE) if created.parent and s.context.span_id == created.parent.span_id]
    assert rpc.kind == trace.SpanKind.SERVER and rpc.parent is None
    assert rpc.attributes == {"rpc.system": "grpc", "rpc.service": "userexport.v1.UsersExportService",
                              "rpc.method": "CreateUsersExportJob", "rpc.grpc.status_code": 0}
    logged, = (line for line in map(json.loads, out.getvalue().splitlines()) if line["event"] == "job created")
    assert logged["job_id"] == job.id and logged["trace_id"] == f"{rpc.context.trace_id:032x}"  # on an API thread
    stages = {name: named(spans, f"export.{name}", job.id) for name in ("claimed", "planned", "slice", "upload",
                                                                       "completed")}
    assert [len(found) for found in stages.values()] == [1, 1, 3, 1, 1]  # the last slice's worker assembles
    assert sorted(attribute(s, "userexport.slice") for s in stages["slice"]) == [0, 1, 2]
    assert sum(attribute(s, "userexport.users") for s in stages["slice"]) == 500
    assert attribute(stages["planned"][0], "userexport.slices") == 3
    for span in (s for found in stages.values() for s in found):
        assert span.context.trace_id == rpc.context.trace_id, span.name
        assert span.parent is not None and span.parent.span_id == created.context.span_id, span.name

    watch = [s for s in named(spans, "userexport.v1.UsersExportService/WatchJob")
             if attribute(s, "rpc.grpc.status_code") == 0]
    assert watch, "the stream's span ends with its status"


def test_an_export_run_by_another_replica_joins_the_trace_of_its_creation(tmp_path: pathlib.Path) -> None:
    """The job row keeps the creation span's traceparent: replica B's export spans are its children,
    though replica A (no workers) created the job."""
    exporters = [InMemorySpanExporter(), InMemorySpanExporter()]
    providers = [TracerProvider(), TracerProvider()]
    for provider, exporter in zip(providers, exporters, strict=True):
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    creator = ServerHandle(tmp_path / "a", tracer_provider=providers[0], workers=0)
    try:
        runner = ServerHandle(tmp_path / "b", tracer_provider=providers[1],
                              database_url=creator.settings.sqlalchemy_url)
        try:
            tenant = new_tenant()
            creator.seed(50, tenant=tenant)
            caller = Caller(creator, tenant)
            try:
                job = caller.create(format=pb.ExportRequest.CSV)
            finally:
                caller.close()
            exported = eventually(lambda: named(exporters[1], "export.completed", job.id), "B completes the export")
        finally:
            runner.stop()
    finally:
        creator.stop()
    created, = named(exporters[0], "export.created", job.id)
    assert attribute(created, "userexport.created") is True
    claimed, = named(exporters[1], "export.claimed", job.id)
    for span in (claimed, *exported, *named(exporters[1], "export.slice", job.id)):
        assert span.context.trace_id == created.context.trace_id, span.name
        assert span.parent is not None and span.parent.span_id == created.context.span_id and span.parent.is_remote
    assert not named(exporters[0], "export.claimed", job.id), "A has no workers"


def test_a_failed_export_ends_in_a_failed_span(traced: tuple[ServerHandle, InMemorySpanExporter],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    server, spans = traced
    tenant = new_tenant()
    server.seed(10, tenant=tenant)

    def broken(*args: Any, **kwargs: Any) -> int:
        raise RuntimeError("the engine broke")
    monkeypatch.setattr(phases, "run_export", broken)
    caller = Caller(server, tenant)
    try:
        job = caller.create(format=pb.ExportRequest.JSON)
        assert caller.finish(job.id).status == pb.Job.FAILED
    finally:
        caller.close()
    failed, = eventually(lambda: named(spans, "export.failed", job.id), "the failed span")
    created, = named(spans, "export.created", job.id)
    assert failed.status.status_code == trace.StatusCode.ERROR and failed.status.description == FAILED_INTERNALLY
    assert failed.parent is not None and failed.parent.span_id == created.context.span_id
    piece, = named(spans, "export.slice", job.id)
    assert piece.status.status_code == trace.StatusCode.ERROR and piece.events[0].name == "exception"
    assert not named(spans, "export.completed", job.id)


def test_the_callers_traceparent_is_continued_and_errors_keep_their_code(
        traced: tuple[ServerHandle, InMemorySpanExporter]) -> None:
    server, spans = traced
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.UsersExportServiceStub(channel)
        metadata = [*server.metadata(new_tenant()), ("traceparent", f"00-{TRACE_ID}-{CALLER_SPAN}-01"),
                    ("tracestate", "vendor=value")]
        with pytest.raises(grpc.RpcError) as refused:
            stub.GetJob(pb.GetJobRequest(id="job_AAAAAAAAAAAAAAAA"), metadata=metadata)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    span = eventually(lambda: next((s for s in named(spans, "userexport.v1.UsersExportService/GetJob")
                                    if s.context.trace_id == int(TRACE_ID, 16)), None), "the GetJob span")
    assert span.parent is not None and span.parent.span_id == int(CALLER_SPAN, 16) and span.parent.is_remote
    assert span.context.trace_state.get("vendor") == "value"
    assert attribute(span, "rpc.grpc.status_code") == grpc.StatusCode.NOT_FOUND.value[0]
    assert span.status.is_unset  # a client's mistake is not the server's error


def test_tracing_is_off_by_default(tmp_path: pathlib.Path) -> None:
    """No provider, exporter or interceptor, and the process's global provider is left alone."""
    server = ServerHandle(tmp_path)
    try:
        assert server.app.tracing.provider is None and not server.app.tracing.interceptors()
        assert not server.app.tracing.tracer.start_span("x").is_recording()
        assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    finally:
        server.stop()


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace collector that keeps what it is sent."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,
               context: grpc.ServicerContext) -> trace_service_pb2.ExportTraceServiceResponse:
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


def test_spans_reach_an_otlp_collector_by_stop(tmp_path: pathlib.Path) -> None:
    collector, receiver = _Collector(), grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, receiver)
    port = receiver.add_insecure_port("127.0.0.1:0")
    receiver.start()
    try:
        server = ServerHandle(tmp_path, otlp_endpoint=f"http://127.0.0.1:{port}")
        try:
            with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError):
                pb_grpc.UsersExportServiceStub(channel).GetJob(pb.GetJobRequest(id="job_AAAAAAAAAAAAAAAA"),
                                                               metadata=server.metadata())
        finally:
            server.stop()  # flushes the batch
    finally:
        receiver.stop(None)
    exported = [(resource.resource, span) for request in collector.requests for resource in request.resource_spans
                for scope in resource.scope_spans for span in scope.spans]
    assert [span.name for _, span in exported] == ["userexport.v1.UsersExportService/GetJob"]
    assert {a.key: a.value.string_value for a in exported[0][0].attributes}["service.name"] == "userexport"
