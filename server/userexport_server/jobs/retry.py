"""One retry rule for background work: jittered backoff (userexport.backoff), database faults only."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from userexport.backoff import Backoff
from userexport_server.db.faults import DatabaseUnavailable
from userexport_server.logs import EventLog

log = EventLog(__name__)
T = TypeVar("T")


def retry_transient(call: Callable[[], T], *, what: str, job_id: str, attempts: int, backoff: Backoff) -> T:
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
            log.warning(f"retrying {what}", job_id=job_id, attempt=f"{attempt}/{attempts}", in_seconds=round(delay, 2),
                        error=error)
            time.sleep(delay)
    raise AssertionError("unreachable: attempts must be >= 1")
