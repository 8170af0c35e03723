"""Structured logs: one line per event, an event phrase and named fields.

Code logs through EventLog: `log.info("job created", job_id=job.id, tenant=tenant)`. The fields travel
on the record (`extra`), so the JSON form writes them as they are, typed, and never parses text back;
the text form prints `event key=value ...` after a fixed prefix, easy to grep. A line of another
library's logger has its whole message as the JSON event.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeAlias

from opentelemetry import trace

TEXT_FORMAT = "ts=%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)s"
# Keys every JSON line has (null when the line does not say); the identifiers stay strings.
_IDENTIFIERS = ("job_id", "tenant", "request_id")
_EVENT, _FIELDS = "userexport_event", "userexport_fields"  # where the record carries them
ExcInfo: TypeAlias = BaseException | bool | tuple[type[BaseException], BaseException, TracebackType] | None


def configure(level: str, log_format: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Migrations log every plugin they load at INFO; only their problems are news.
    logging.getLogger("alembic").setLevel(max(root.level, logging.WARNING))


class EventLog:
    """A module's logger of events: `log.warning("lease renewal failed", job_id=..., error=error)`.
    Fields are rendered only when the line is written."""

    __slots__ = ("logger",)

    def __init__(self, name: str) -> None:
        self.logger = logging.getLogger(name)

    def isEnabledFor(self, level: int) -> bool:
        return self.logger.isEnabledFor(level)

    def log(self, level: int, event: str, /, *, exc_info: ExcInfo = None, **fields: object) -> None:
        self._emit(level, event, exc_info, fields)

    def debug(self, event: str, /, **fields: object) -> None:
        self._emit(logging.DEBUG, event, None, fields)

    def info(self, event: str, /, **fields: object) -> None:
        self._emit(logging.INFO, event, None, fields)

    def warning(self, event: str, /, *, exc_info: ExcInfo = None, **fields: object) -> None:
        self._emit(logging.WARNING, event, exc_info, fields)

    def error(self, event: str, /, *, exc_info: ExcInfo = None, **fields: object) -> None:
        self._emit(logging.ERROR, event, exc_info, fields)

    def exception(self, event: str, /, **fields: object) -> None:
        """An error with the exception being handled."""
        self._emit(logging.ERROR, event, True, fields)

    def _emit(self, level: int, event: str, exc_info: ExcInfo, fields: Mapping[str, object]) -> None:
        if self.logger.isEnabledFor(level):
            # An exception is kept as its text: a record that held it (in a handler's buffer) would
            # hold its traceback's frames, and with them whatever failed, alive.
            fields = {key: _plain(value) for key, value in fields.items()}
            self.logger.log(level, "%s", _Text(event, fields), exc_info=exc_info, stacklevel=3,
                            extra={_EVENT: event, _FIELDS: fields})


class _Text:
    """`event key=value ...`, made when (and only if) a handler formats the line."""

    __slots__ = ("event", "fields")

    def __init__(self, event: str, fields: Mapping[str, object]) -> None:
        self.event, self.fields = event, fields

    def __str__(self) -> str:
        return " ".join([self.event, *(f"{key}={_plain(value)}" for key, value in self.fields.items())])


def _plain(value: object) -> object:
    """A field's value for a line: an exception as `Type: first line of its message`."""
    if isinstance(value, BaseException):
        text = str(getattr(value, "orig", None) or value).strip().splitlines()
        return f"{type(value).__name__}: {text[0]}" if text else type(value).__name__
    return value


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, event, job_id, tenant, request_id, trace_id and span_id
    (from the current OpenTelemetry span), every other field of the event as its own key, and
    `exception` with the traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, object] = dict(getattr(record, _FIELDS, None) or {})
        event = getattr(record, _EVENT, None) or record.getMessage()
        span = trace.get_current_span().get_span_context()
        line: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname, "logger": record.name, "event": event,
            **{key: _identifier(fields.pop(key, None)) for key in _IDENTIFIERS},
            "trace_id": f"{span.trace_id:032x}" if span.is_valid else None,
            "span_id": f"{span.span_id:016x}" if span.is_valid else None,
        }
        for key, value in fields.items():
            line.setdefault(key, _plain(value))  # a field named like a fixed key does not replace it
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str)


def _identifier(value: object) -> str | None:
    return None if value is None else str(value)


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

    def __init__(self, logger: EventLog, *, limit: int = 10, window: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger, self.limit, self.window, self.clock = logger, limit, window, clock
        self._windows: dict[str, _Window] = {}
        self._lock = threading.Lock()

    def log(self, level: int, key: str, event: str, /, *, exc_info: ExcInfo = None, **fields: object) -> None:
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
            self.logger.log(level, "log lines suppressed", key=key, count=dropped, window_seconds=self.window)
        if allowed:
            self.logger.log(level, event, exc_info=exc_info, **fields)
        elif first_dropped:
            self.logger.log(level, "log rate limit reached", key=key, limit=self.limit, window_seconds=self.window,
                            then="suppressed until the window ends")
