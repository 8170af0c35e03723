"""Structured logs: one line per event. Every message is an event phrase then `key=value` pairs
(`job created job_id=%s tenant=%s`, a value with spaces as %r); the text form prints it after a fixed
prefix, easy to grep; the JSON form parses it into one object a line, for log pipelines."""
from __future__ import annotations

import ast
import datetime as dt
import json
import logging
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace

TEXT_FORMAT = "ts=%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)s"
# Keys every JSON line has (null when the message does not say); the identifiers stay strings.
_IDENTIFIERS = ("job_id", "tenant", "request_id")
_KEY = re.compile(r"(?:^| )([a-z_][a-z0-9_]*)=")
_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"")
_CALL = re.compile(r"[A-Za-z_][\w.]*\(")
_NUMBER = re.compile(r"-?\d+(\.\d+)?")
_WORDS: dict[str, Any] = {"True": True, "False": False, "None": None}


def configure(level: str, log_format: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Migrations log every plugin they load at INFO; only their problems are news.
    logging.getLogger("alembic").setLevel(max(root.level, logging.WARNING))


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, event, job_id, tenant, request_id, trace_id and span_id
    (from the current OpenTelemetry span), every other `key=value` of the message as its own key, and
    `exception` with the traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        event, pairs = parse_message(record.getMessage())
        span = trace.get_current_span().get_span_context()
        line: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname, "logger": record.name, "event": event,
            **{key: _identifier(pairs.pop(key, None)) for key in _IDENTIFIERS},
            "trace_id": f"{span.trace_id:032x}" if span.is_valid else None,
            "span_id": f"{span.span_id:016x}" if span.is_valid else None,
        }
        for key, value in pairs.items():
            line.setdefault(key, _typed(value))  # a pair named like a fixed key does not replace it
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str)


def parse_message(message: str) -> tuple[str, dict[str, str]]:
    """The event phrase (the text before the first `key=`) and the pairs. A value runs to the next
    ` key=`, unless it is what %r writes: a quoted string (unquoted) or a call such as an exception's
    repr, each taken whole, so spaces and `=` inside them survive."""
    found = _KEY.search(message)
    if found is None:
        return message, {}
    event, pairs = message[:found.start()], {}
    while found is not None:
        start = found.end()
        end = _repr_end(message, start)
        if end is not None:
            value = message[start:end]
            value = _unquote(value) if value[0] in "'\"" else value
        else:
            following = _KEY.search(message, start)
            end = following.start() if following is not None else len(message)
            value = message[start:end]
        pairs[found.group(1)] = value
        found = _KEY.search(message, end)
    return event, pairs


def _repr_end(text: str, start: int) -> int | None:
    """Where a %r value starting at `start` ends, if there is one there (followed by a space or the end)."""
    quoted = _QUOTED.match(text, start)
    end = quoted.end() if quoted is not None else _call_end(text, start)
    return end if end is not None and text[end:end + 1] in ("", " ") else None


def _call_end(text: str, start: int) -> int | None:
    """The end of a call such as an exception's repr, `OperationalError('...')`: its parentheses balanced
    outside quoted strings."""
    call = _CALL.match(text, start)
    if call is None:
        return None
    depth, i = 1, call.end()
    while i < len(text):
        inner = _QUOTED.match(text, i)
        if inner is not None:
            i = inner.end()
            continue
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        i += 1
        if depth == 0:
            return i
    return None


def _unquote(literal: str) -> str:
    try:
        return str(ast.literal_eval(literal))
    except (ValueError, SyntaxError):
        return literal


def _identifier(value: str | None) -> str | None:
    return None if value in (None, "None") else value


def _typed(value: str) -> Any:
    """Numbers and True/False/None as JSON numbers, booleans and null; anything else stays a string."""
    if _NUMBER.fullmatch(value):
        return float(value) if "." in value else int(value)
    return _WORDS.get(value, value)


@dataclass(slots=True)
class _Window:
    start: float
    lines: int = 0
    suppressed: int = 0


class RateLimitedLog:
    """At most `limit` lines per key per `window` seconds, so a client repeating one bad request cannot
    fill the disk; the first line of the next window says how many were left out.

    Keys must come from a small fixed set (a method and an error reason), never from request text.
    """

    def __init__(self, logger: logging.Logger, *, limit: int = 10, window: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger, self.limit, self.window, self.clock = logger, limit, window, clock
        self._windows: dict[str, _Window] = {}
        self._lock = threading.Lock()

    def log(self, level: int, key: str, message: str, *args: object,
            exc_info: BaseException | None = None) -> None:
        with self._lock:
            now = self.clock()
            current = self._windows.get(key)
            dropped = 0
            if current is None or now - current.start >= self.window:
                dropped = current.suppressed if current is not None else 0
                current = self._windows[key] = _Window(now)
            current.lines += 1
            allowed = current.lines <= self.limit
            if not allowed:
                current.suppressed += 1
            first_dropped = current.suppressed == 1 and not allowed
        if dropped:
            self.logger.log(level, "log lines suppressed key=%s count=%d window_seconds=%.0f", key, dropped,
                            self.window)
        if allowed:
            self.logger.log(level, message, *args, exc_info=exc_info)
        elif first_dropped:
            self.logger.log(level, "log rate limit reached key=%s limit=%d window_seconds=%.0f; "
                                   "suppressing until the window ends", key, self.limit, self.window)
