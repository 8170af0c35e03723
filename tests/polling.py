"""The one way tests wait for something to happen: poll a probe until it returns something truthy."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def eventually(probe: Callable[[], T | None], what: str, timeout: float = 20.0, every: float = 0.05) -> T:
    """Poll `probe` until it returns something truthy; fail saying `what` did not happen in time."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:.0f} s (last: {value!r})")
        time.sleep(every)
