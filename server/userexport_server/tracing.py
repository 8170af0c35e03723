"""OpenTelemetry traces: a SERVER span for each RPC, continued from the caller's W3C trace context, and a
span for each stage of each export, all carrying the job's id.

An export's spans are children of its `export.created` span (in the CreateUsersExportJob RPC's trace),
on whichever replica runs them: the job row keeps that span's W3C traceparent. The `userexport.job_id`
attribute names the job on every span.

Tracing is off unless an OTLP endpoint is configured: no interceptor is installed then, and the export
spans are the API's no-op spans, a few calls per export stage and nothing per row or per RPC.
"""
from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any, Literal

import grpc
from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import Attributes

from userexport_server.errors import WorkStopped
from userexport_server.rpc_codes import final_code

JOB_ID = "userexport.job_id"
# A job as its spans know it: its id, and the traceparent of its creation (None: created untraced).
JobRef = tuple[str, str | None]
_PROPAGATOR = TraceContextTextMapPropagator()  # W3C traceparent/tracestate, whatever OTEL_PROPAGATORS says
# Codes that are the server's fault, so the span's status is ERROR (OpenTelemetry's gRPC conventions).
_SERVER_ERRORS = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED,
                            grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE,
                            grpc.StatusCode.DATA_LOSS})


class Tracing:
    """An App's traces: its own TracerProvider (never the global one, so several Apps in one process keep
    their spans apart) or none (off). Building it starts nothing; start() attaches the exporter, stop()
    flushes and shuts it down."""

    def __init__(self, provider: TracerProvider | None = None,
                 exporter: Callable[[], SpanExporter] | None = None) -> None:
        self.provider, self._exporter = provider, exporter
        self.tracer: trace.Tracer = provider.get_tracer(__name__) if provider is not None else trace.NoOpTracer()

    @classmethod
    def configured(cls, otlp_endpoint: str, provider: TracerProvider | None = None) -> Tracing:
        """The given provider (tests pass one with an in-memory exporter); else an OTLP/gRPC export to the
        endpoint; else off."""
        if provider is not None or not otlp_endpoint:
            return cls(provider)
        # OTEL_SERVICE_NAME, when set, names the service; OTEL_EXPORTER_OTLP_HEADERS, _CERTIFICATE, _TIMEOUT
        # and the like are read by the exporter itself.
        resource = Resource.create({} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: "userexport"})

        def exporter() -> SpanExporter:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            return OTLPSpanExporter(endpoint=otlp_endpoint)
        return cls(TracerProvider(resource=resource), exporter)

    def start(self) -> None:
        if self.provider is not None and self._exporter is not None:
            self.provider.add_span_processor(BatchSpanProcessor(self._exporter()))

    def stop(self) -> None:
        """Export what is still queued, then shut the exporter down."""
        if self.provider is not None:
            self.provider.shutdown()

    def interceptors(self) -> Sequence[grpc.aio.ServerInterceptor]:
        return [_RpcSpans(self.tracer)] if self.provider is not None else []

    # --- export spans --------------------------------------------------------------------------

    @contextlib.contextmanager
    def creating(self) -> Iterator[Creation]:
        """The `export.created` span around a job's insert, a child of the current (RPC) span: the job
        row keeps its traceparent (None when tracing is off) as the parent of the export's spans."""
        with self.tracer.start_as_current_span("export.created") as span:
            carrier: dict[str, str] = {}
            if self.provider is not None:
                _PROPAGATOR.inject(carrier)
            yield Creation(span, carrier.get("traceparent"))

    @contextlib.contextmanager
    def span(self, stage: str, job: JobRef, attributes: Attributes = None) -> Iterator[trace.Span]:
        """A stage of a job's export, current while it runs (so log lines carry its trace id). An error is
        recorded with status ERROR; a stop (cancel, shutdown, lease lost) is no error, only an event."""
        span = self._start(stage, job, attributes)
        with trace.use_span(span, end_on_exit=True, record_exception=False, set_status_on_exception=False):
            try:
                yield span
            except WorkStopped:
                span.add_event("stopped")
                raise
            except Exception as error:
                span.record_exception(error)
                span.set_status(trace.StatusCode.ERROR, type(error).__name__)
                raise

    def mark(self, stage: str, job: JobRef, attributes: Attributes = None) -> None:
        """A moment of a job's export (claimed), as a span of no length."""
        self._start(stage, job, attributes).end()

    def ended(self, outcome: Literal["completed", "failed"], job: JobRef,
              attributes: Attributes = None, error: str | None = None) -> None:
        """The export's last span."""
        span = self._start(outcome, job, attributes)
        if error is not None:
            span.set_status(trace.StatusCode.ERROR, error)
        span.end()

    def _start(self, stage: str, job: JobRef, attributes: Attributes) -> trace.Span:
        """`export.<stage>`, a child of the job's creation span (else of the current span: a job created
        while tracing was off)."""
        job_id, trace_parent = job
        parent = _PROPAGATOR.extract({"traceparent": trace_parent}) if trace_parent else None
        return self.tracer.start_span(f"export.{stage}", context=parent,
                                      attributes={JOB_ID: job_id, **(attributes or {})})


class Creation:
    """The span of a job's creation, and the traceparent its job row keeps."""

    __slots__ = ("span", "traceparent")

    def __init__(self, span: trace.Span, traceparent: str | None) -> None:
        self.span, self.traceparent = span, traceparent

    def created(self, job_id: str, new: bool) -> None:
        """Name the job on the span; a repeated request_id returned the job an earlier call created."""
        self.span.set_attributes({JOB_ID: job_id, "userexport.created": new})


class _RpcSpans(grpc.aio.ServerInterceptor):
    """A SERVER span around each RPC, named by its method (`userexport.v1.UsersExportService/GetJob`), the
    child of the caller's span when its metadata carries a traceparent, with the final gRPC status code;
    a streaming RPC's span lasts until its last message."""

    def __init__(self, tracer: trace.Tracer) -> None:
        self.tracer = tracer

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        kind = f"{'stream' if handler.request_streaming else 'unary'}_" \
               f"{'stream' if handler.response_streaming else 'unary'}"
        behavior = getattr(handler, kind)
        method = details.method.lstrip("/")
        carrier = {key: value for key, value in details.invocation_metadata or () if isinstance(value, str)}

        if inspect.isasyncgenfunction(behavior):
            async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                with self._span(method, carrier, context):
                    async for message in behavior(request, context):
                        yield message
            return handler._replace(**{kind: streaming})

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            with self._span(method, carrier, context):
                return await behavior(request, context)
        return handler._replace(**{kind: unary})

    @contextlib.contextmanager
    def _span(self, method: str, carrier: dict[str, str], context: grpc.aio.ServicerContext) -> Iterator[None]:
        service, _, name = method.partition("/")
        with self.tracer.start_as_current_span(
                method, context=_PROPAGATOR.extract(carrier), kind=trace.SpanKind.SERVER,
                attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
                record_exception=False, set_status_on_exception=False) as span:
            code = grpc.StatusCode.UNKNOWN  # an exception the servicer did not turn into a status
            try:
                yield
                code = _code(context)
            except grpc.aio.AbortError:  # context.abort(): the code it set
                code = _code(context)
                raise
            except asyncio.CancelledError:  # the client went away or the deadline passed
                code = grpc.StatusCode.CANCELLED
                raise
            finally:
                span.set_attribute("rpc.grpc.status_code", code.value[0])
                if code in _SERVER_ERRORS:
                    span.set_status(trace.StatusCode.ERROR, code.name)


def _code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """The status the handler set, OK when none."""
    return final_code(context) or grpc.StatusCode.OK
