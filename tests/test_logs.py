"""JSON log lines: the `event key=value` messages parsed into one object a line, the identifiers and the
current span's trace id in keys of their own, an exception as a field; and the real server's stderr in
that form when USEREXPORT_LOG_FORMAT=json."""
from __future__ import annotations

import io
import json
import logging
import pathlib
import signal
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider

from tests.harness import ServerProcess
from userexport_server import logs
from userexport_server.logs import JsonFormatter, parse_message

FIXED_KEYS = {"time", "level", "logger", "event", "job_id", "tenant", "request_id", "trace_id", "span_id"}


@pytest.fixture
def json_log() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("userexport_server.test_logs")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, out
    logger.removeHandler(handler)


def lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]  # each line parses on its own


def test_a_message_becomes_an_object_with_the_fixed_keys_and_its_pairs(
        json_log: tuple[logging.Logger, io.StringIO]) -> None:
    logger, out = json_log
    logger.info("job created job_id=%s tenant=%s request_id=%s format=%s limit=%s fields=%d", "job_A", "007",
                "r-1", "csv", None, 3)
    logger.warning("no pairs at all")
    created, plain = lines(out)
    assert created.keys() >= FIXED_KEYS and plain.keys() >= FIXED_KEYS
    assert created["event"] == "job created" and created["level"] == "INFO"
    assert created["logger"] == "userexport_server.test_logs" and created["time"].endswith("Z")
    assert (created["job_id"], created["tenant"], created["request_id"]) == ("job_A", "007", "r-1")  # strings
    assert (created["format"], created["limit"], created["fields"]) == ("csv", None, 3)
    assert created["trace_id"] is None  # no span
    assert plain["event"] == "no pairs at all" and plain["job_id"] is None


def test_values_with_spaces_survive(json_log: tuple[logging.Logger, io.StringIO]) -> None:
    """%r strings and exception reprs are taken whole, even with spaces, quotes or `k=v` inside; an
    unquoted value runs to the next key."""
    logger, out = json_log
    logger.error("export failed job_id=%s cause=%r error=%r reasons=%s", "job_B", "it's down (a=b, c)",
                 RuntimeError("x=1 (y"), "database: unreachable: refused")
    line, = lines(out)
    assert line["cause"] == "it's down (a=b, c)"
    assert line["error"] == "RuntimeError('x=1 (y')"
    assert line["reasons"] == "database: unreachable: refused"


def test_an_exception_becomes_a_field(json_log: tuple[logging.Logger, io.StringIO]) -> None:
    logger, out = json_log
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("export worker error job_id=%s", "job_C")
    line, = lines(out)
    assert line["job_id"] == "job_C" and line["level"] == "ERROR"
    assert "Traceback" in line["exception"] and "ValueError: boom" in line["exception"]


def test_the_current_spans_trace_id_is_in_the_line(json_log: tuple[logging.Logger, io.StringIO]) -> None:
    logger, out = json_log
    with TracerProvider().get_tracer(__name__).start_as_current_span("work") as span:
        logger.info("slice done job_id=%s", "job_D")
    line, = lines(out)
    assert line["trace_id"] == f"{span.get_span_context().trace_id:032x}"
    assert line["span_id"] == f"{span.get_span_context().span_id:016x}"


def test_parse_message_keeps_the_event_phrase_before_the_first_key() -> None:
    assert parse_message("retrying slice done job_id=job_E attempt=2/6") == (
        "retrying slice done", {"job_id": "job_E", "attempt": "2/6"})


def test_text_stays_the_default() -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        logs.configure("INFO")
        formatter = root.handlers[0].formatter
        assert formatter is not None and not isinstance(formatter, JsonFormatter)
        assert formatter._fmt == logs.TEXT_FORMAT
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def test_the_server_writes_json_lines_when_configured(tmp_path: pathlib.Path) -> None:
    server = ServerProcess(tmp_path / "data", env={"USEREXPORT_LOG_FORMAT": "json"})
    try:
        server.signal(signal.SIGTERM)
        assert server.wait() == 0
    finally:
        server.stop()
    records = [json.loads(line) for line in server.log_text().splitlines()]
    assert records and all(record.keys() >= FIXED_KEYS for record in records)
    started, = (r for r in records if r["event"] == "server started")
    assert started["port"] == server.port and started["workers"] == 2
    assert any(r["event"] == "server stopped" for r in records)
