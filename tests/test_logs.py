"""Log lines from events: the fields travel on the record, so the JSON form writes them typed and whole
(no text is parsed back), with the identifiers and the current span's trace id in keys of their own
and an exception as a field; the text form stays `event key=value`; a rate-limited log says how many
lines it left out. (The real server's stderr as JSON: tests/integration/test_logs.py.)"""
from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider

from userexport_server import logs
from userexport_server.logs import EventLog, JsonFormatter, RateLimitedLog

FIXED_KEYS = {"time", "level", "logger", "event", "job_id", "tenant", "request_id", "trace_id", "span_id"}


@pytest.fixture
def json_log() -> Iterator[tuple[EventLog, io.StringIO]]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    log = EventLog("userexport_server.test_logs")
    log.logger.addHandler(handler)
    log.logger.setLevel(logging.DEBUG)
    log.logger.propagate = False
    yield log, out
    log.logger.removeHandler(handler)


def lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]  # each line parses on its own


def test_a_message_becomes_an_object_with_the_fixed_keys_and_its_pairs(
        json_log: tuple[EventLog, io.StringIO]) -> None:
    logger, out = json_log
    logger.info("job created", job_id="job_A", tenant="007", request_id="r-1", format="csv", limit=None, fields=3)
    logging.getLogger("userexport_server.test_logs").warning("a plain line of %s", "another library")
    created, plain = lines(out)
    assert created.keys() >= FIXED_KEYS and plain.keys() >= FIXED_KEYS
    assert created["event"] == "job created" and created["level"] == "INFO"
    assert created["logger"] == "userexport_server.test_logs" and created["time"].endswith("Z")
    assert (created["job_id"], created["tenant"], created["request_id"]) == ("job_A", "007", "r-1")  # strings
    assert (created["format"], created["limit"], created["fields"]) == ("csv", None, 3)
    assert created["trace_id"] is None  # no span
    assert plain["event"] == "a plain line of another library" and plain["job_id"] is None


def test_values_are_written_whole_and_typed(json_log: tuple[EventLog, io.StringIO]) -> None:
    """Text that the old parser split or glued (spaces, quotes, `k=v`, a `;` trailer) stays one value,
    an exception is `Type: its first line`, and numbers, booleans and null keep their types."""
    logger, out = json_log
    logger.error("export failed; the reaper retries", job_id="job_B", cause="it's down (a=b, c)",
                 error=RuntimeError("x=1 (y\nsecond line"), reasons="database: unreachable: refused", seconds=1.25,
                 recorded=True, limit=None)
    line, = lines(out)
    assert line["event"] == "export failed; the reaper retries"
    assert line["cause"] == "it's down (a=b, c)"
    assert line["error"] == "RuntimeError: x=1 (y"
    assert line["reasons"] == "database: unreachable: refused"
    assert (line["seconds"], line["recorded"], line["limit"]) == (1.25, True, None)


def test_the_text_form_is_event_then_key_value_pairs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="userexport_server.test_text")
    EventLog("userexport_server.test_text").info("slice done", job_id="job_T", slice=0, seconds=0.5,
                                                 error=ValueError("bad\nmore"))
    assert caplog.messages == ["slice done job_id=job_T slice=0 seconds=0.5 error=ValueError: bad"]


def test_an_exception_becomes_a_field(json_log: tuple[EventLog, io.StringIO]) -> None:
    logger, out = json_log
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("export worker error", job_id="job_C")
    line, = lines(out)
    assert line["job_id"] == "job_C" and line["level"] == "ERROR"
    assert "Traceback" in line["exception"] and "ValueError: boom" in line["exception"]


def test_the_current_spans_trace_id_is_in_the_line(json_log: tuple[EventLog, io.StringIO]) -> None:
    logger, out = json_log
    with TracerProvider().get_tracer(__name__).start_as_current_span("work") as span:
        logger.info("slice done", job_id="job_D")
    line, = lines(out)
    assert line["trace_id"] == f"{span.get_span_context().trace_id:032x}"
    assert line["span_id"] == f"{span.get_span_context().span_id:016x}"


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


def test_the_rate_limited_log_says_how_many_lines_it_left_out(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    limited = RateLimitedLog(EventLog("test.limited"), limit=3, window=60, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="test.limited"):
        for i in range(50):
            limited.log(logging.INFO, "k", "line", n=i)
        limited.log(logging.INFO, "other", "another key is counted apart")
        now[0] = 61.0
        limited.log(logging.INFO, "k", "after the window")
    messages = [r.getMessage() for r in caplog.records]
    assert messages[:3] == ["line n=0", "line n=1", "line n=2"]
    assert "log rate limit reached key=k" in messages[3]
    assert messages[4] == "another key is counted apart"
    assert messages[5].startswith("log lines suppressed key=k count=47")
    assert messages[6:] == ["after the window"]
