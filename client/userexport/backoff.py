"""One backoff rule for every retry loop, server and client: exponential, capped, with jitter.

Jitter matters once there are replicas: after a database blip every replica's workers and
listeners fail at the same moment, and without it they would retry in step, hitting the database
together each time. "Equal jitter": the wait is drawn between half the exponential delay and all
of it, so it still grows, yet no two waiters keep the same rhythm.
"""
from __future__ import annotations

from dataclasses import dataclass
from random import uniform


@dataclass(frozen=True, slots=True)
class Backoff:
    """Waits of about initial, 2x, 4x ... capped at maximum, each jittered down by up to half."""

    initial: float = 0.2
    maximum: float = 5.0

    def delay(self, attempt: int) -> float:
        """The wait after failed attempt number `attempt` (1 = the first)."""
        ceiling = min(self.maximum, self.initial * 2 ** min(max(0, attempt - 1), 32))
        return uniform(ceiling / 2, ceiling)  # spreading retries, not a secret
