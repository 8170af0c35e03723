"""Tracing on its own: where the OTLP endpoint comes from, a provider built but started only by
start(), and a stopped stage as an event. (Traces of a real server: tests/integration/test_tracing.py.)"""
from __future__ import annotations

import datetime as dt
import pathlib
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from userexport_server.export.engine import ExportCancelled
from userexport_server.export.spec import ExportSpec, Format
from userexport_server.jobs.model import Job, JobStatus
from userexport_server.settings import Settings
from userexport_server.tracing import JOB_ID, Tracing


def attribute(span: ReadableSpan, key: str) -> Any:
    return (span.attributes or {})[key]


def test_the_endpoint_comes_from_ours_or_the_standard_variables(tmp_path: pathlib.Path) -> None:
    env = {"USEREXPORT_DATA_DIR": str(tmp_path), "OTEL_EXPORTER_OTLP_ENDPOINT": "http://any:4317"}
    assert Settings.from_env(env).otlp_endpoint == "http://any:4317"
    assert Settings.from_env({**env, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://traces:4317"}).otlp_endpoint \
        == "http://traces:4317"
    assert Settings.from_env({**env, "USEREXPORT_OTLP_ENDPOINT": "https://ours:4317"}).otlp_endpoint \
        == "https://ours:4317"
    assert Settings.from_env({**env, "USEREXPORT_OTLP_ENDPOINT": "https://ours:4317",
                              "OTEL_SDK_DISABLED": "true"}).otlp_endpoint == ""


def test_an_endpoint_builds_a_provider_whose_exporter_waits_for_start() -> None:
    tracing = Tracing.configured("http://127.0.0.1:9")
    assert tracing.provider is not None and tracing.interceptors()
    assert not tracing.provider._active_span_processor._span_processors  # built, not started
    tracing.start()
    assert tracing.provider._active_span_processor._span_processors
    tracing.stop()


def test_a_stopped_stage_is_an_event_not_an_error() -> None:
    spans, provider = InMemorySpanExporter(), TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    tracing = Tracing(provider)
    now = dt.datetime.now(dt.UTC)
    job = Job(id="job_S", tenant="t", status=JobStatus.PROCESSING, version=2, spec=ExportSpec(Format.CSV, ()),
              connection_name=None, created_at=now, updated_at=now, expires_at=now)  # created while tracing was off
    with pytest.raises(ExportCancelled), tracing.span("slice", (job.id, job.trace_parent)):
        raise ExportCancelled()
    stopped, = spans.get_finished_spans()
    assert stopped.status.is_unset and [event.name for event in stopped.events] == ["stopped"]
    assert attribute(stopped, JOB_ID) == "job_S" and stopped.parent is None  # created elsewhere: a root
