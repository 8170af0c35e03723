"""One retry rule for background work: exponential backoff, transient errors only, and a stop signal."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from userexport_server.db.faults import is_transient_db_error

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delays of initial, 2x, 4x ... capped at maximum: a stalled database gets room to recover
    without a thread spinning on it."""

    initial: float = 0.2
    maximum: float = 5.0

    def delay(self, attempt: int) -> float:
        """The wait after failed attempt number `attempt` (1 = the first)."""
        return min(self.maximum, self.initial * 2 ** max(0, attempt - 1))


def retry_transient(call: Callable[[], T], *, what: str, attempts: int, backoff: Backoff) -> T:
    """call(), again after a backoff while it raises a transient database error, at most `attempts` times.

    The last error, or the first permanent one, is raised to the caller.
    """
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as error:
            if attempt == attempts or not is_transient_db_error(error):
                raise
            delay = backoff.delay(attempt)
            log.warning("retrying %s attempt=%d/%d in_seconds=%.2f error=%s", what, attempt, attempts, delay,
                        _brief(error))
            time.sleep(delay)
    raise AssertionError("unreachable: attempts must be >= 1")


def _brief(error: BaseException) -> str:
    """The error's first line: SQLAlchemy appends the SQL and a link, which a retry log line needs not."""
    text = str(getattr(error, "orig", None) or error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"
