"""The one backoff rule: it grows, is capped, and is jittered so replicas do not retry in step."""
from __future__ import annotations

from userexport.backoff import Backoff


def test_waits_grow_to_the_cap_each_between_half_and_all_of_its_ceiling() -> None:
    backoff = Backoff(initial=0.5, maximum=4.0)
    for attempt, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 4.0), (10_000, 4.0)]:
        waits = [backoff.delay(attempt) for _ in range(200)]
        assert all(ceiling / 2 <= wait <= ceiling for wait in waits), (attempt, min(waits), max(waits))


def test_two_waiters_failing_together_do_not_retry_in_step() -> None:
    """After one database blip every replica fails at once; their next tries must spread out."""
    backoff = Backoff(initial=1.0, maximum=30.0)
    assert len({round(backoff.delay(3), 6) for _ in range(50)}) > 40
