"""One retry rule for background work: jittered backoff (userexport.backoff), database faults only."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from userexport.backoff import Backoff
from userexport_server.db.faults import DatabaseUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")


def retry_transient(call: Callable[[], T], *, what: str, attempts: int, backoff: Backoff) -> T:
    """call(), again after a backoff while it raises DatabaseUnavailable, at most `attempts` times.

    The last error, or the first other one, is raised to the caller.
    """
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except DatabaseUnavailable as error:
            if attempt == attempts:
                raise
            delay = backoff.delay(attempt)
            log.warning("retrying %s attempt=%d/%d in_seconds=%.2f error=%s", what, attempt, attempts, delay, error)
            time.sleep(delay)
    raise AssertionError("unreachable: attempts must be >= 1")
