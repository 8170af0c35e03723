"""Structured logs: one line per event, `key=value` pairs after a fixed prefix, easy to grep and parse."""
from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


def configure(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("ts=%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Migrations log every plugin they load at INFO; only their problems are news.
    logging.getLogger("alembic").setLevel(max(root.level, logging.WARNING))


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
