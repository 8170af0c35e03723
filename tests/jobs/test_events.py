"""The event bus and the job cache: coalescing per watcher, one hop per loop, drain, and what the cache
may serve. Publishers are real threads, watchers real asyncio tasks."""
from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import threading
import tracemalloc

import pytest

from userexport_server.export.defaults import DEFAULT_CSV_FIELDS
from userexport_server.export.spec import ExportSpec, Format
from userexport_server.jobs.cache import JobCache
from userexport_server.jobs.events import Draining, EventBus, JobChange
from userexport_server.jobs.model import Job, JobStatus, now_utc
from userexport_server.jobs.pg_events import PgListener

NOW = now_utc()
JOB = Job(id="job_AAAAAAAAAAAAAAAA", tenant="t", status=JobStatus.PENDING, version=1,
          spec=ExportSpec(Format.CSV, DEFAULT_CSV_FIELDS), connection_name=None, created_at=NOW, updated_at=NOW,
          expires_at=NOW + dt.timedelta(hours=1))


def version(n: int, status: JobStatus = JobStatus.PROCESSING, **changes: object) -> Job:
    return dataclasses.replace(JOB, version=n, status=status, users_written=n, **changes)  # type: ignore[arg-type]


def test_a_watcher_that_does_not_read_keeps_one_progress_per_status_and_every_transition() -> None:
    """A thousand progress versions from a worker thread, while the watcher reads nothing: it then
    gets the transitions in order, each status's newest progress, and the terminal version."""
    async def scenario() -> list[Job]:
        bus = EventBus()
        with bus.subscribe(JOB.id) as watcher:
            def publish() -> None:
                bus.deliver(version(1, JobStatus.PENDING))
                for n in range(2, 1000):
                    bus.deliver(version(n))
                bus.deliver(version(1000, JobStatus.PENDING))  # handed back
                bus.deliver(version(1001))
                bus.deliver(version(1002, JobStatus.COMPLETED))
                bus.deliver(version(500))  # late and old: dropped
            worker = threading.Thread(target=publish)
            worker.start()
            worker.join()
            await asyncio.sleep(0.05)
            assert watcher.pending() == 5
            return [await watcher.get() for _ in range(5)]

    got = asyncio.run(scenario())
    assert [(j.version, j.status) for j in got] == [
        (1, JobStatus.PENDING), (999, JobStatus.PROCESSING), (1000, JobStatus.PENDING), (1001, JobStatus.PROCESSING),
        (1002, JobStatus.COMPLETED)]


def test_a_reading_watcher_sees_every_version_in_order() -> None:
    async def scenario() -> list[int]:
        bus = EventBus()
        seen: list[int] = []
        with bus.subscribe(JOB.id) as watcher:
            for n in range(1, 50):
                bus.deliver(version(n))
                seen.append((await watcher.get()).version)
        return seen

    assert asyncio.run(scenario()) == list(range(1, 50))


def test_drain_hands_over_what_is_pending_then_raises_for_present_and_future_watchers() -> None:
    async def scenario() -> None:
        bus = EventBus()
        with bus.subscribe(JOB.id) as watcher, bus.subscribe("job_BBBBBBBBBBBBBBBB") as idle:
            bus.deliver(version(2))
            await asyncio.sleep(0)
            threading.Thread(target=bus.drain).start()  # SIGTERM arrives on another thread
            assert (await asyncio.wait_for(watcher.get(), 5)).version == 2
            with pytest.raises(Draining):
                await asyncio.wait_for(watcher.get(), 5)
            with pytest.raises(Draining):
                await asyncio.wait_for(idle.get(), 5)
            with bus.subscribe(JOB.id) as late, pytest.raises(Draining):
                await asyncio.wait_for(late.get(), 5)

    asyncio.run(scenario())


def test_ten_thousand_idle_watchers_stay_small() -> None:
    """The memory a subscription costs, measured: the bound stated in docs/operations.md (1 KiB each)."""
    async def scenario() -> int:
        bus = EventBus()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        watchers = [bus.subscribe(f"job_{n:016d}") for n in range(10_000)]
        used = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        assert bus.watcher_count() == 10_000
        for w in watchers:
            w.close()
        assert bus.watcher_count() == 0
        return used

    per_watcher = asyncio.run(scenario()) / 10_000
    print(f"{per_watcher:.0f} bytes per idle subscription")
    assert per_watcher < 1024


def test_the_cache_keeps_the_newest_version_and_never_serves_an_expired_job() -> None:
    cache = JobCache(capacity=3)
    cache.offer(version(5))
    cache.offer(version(4))  # an older read arriving late
    assert cache.get(JOB.id).version == 5  # type: ignore[union-attr]
    cache.outdate(JOB.id, 6)  # another replica changed it: read it again
    assert cache.get(JOB.id) is None
    cache.offer(version(5))
    assert cache.get(JOB.id) is None, "a read older than the notified version was kept"
    cache.offer(version(6, JobStatus.COMPLETED))
    assert cache.get(JOB.id).status == JobStatus.COMPLETED  # type: ignore[union-attr]
    assert cache.get(JOB.id, now=JOB.expires_at) is None, "served a COMPLETED job past its expiry"
    cache.offer(version(7, JobStatus.EXPIRED))
    assert cache.get(JOB.id) is None
    for n in range(3):
        cache.offer(dataclasses.replace(version(1), id=f"job_{n:016d}"))
    assert len(cache) == 3 and cache.get(JOB.id) is None  # the least recently used went


def test_a_read_begun_before_the_cache_was_cleared_is_not_kept() -> None:
    cache = JobCache()
    generation = cache.generation
    cache.clear()  # the listener reconnected meanwhile: the read may predate a missed notification
    cache.offer(version(3), generation)
    assert cache.get(JOB.id) is None
    cache.offer(version(3), cache.generation)
    assert cache.get(JOB.id) is not None


def test_the_cache_is_bypassed_while_the_feed_is_not_whole() -> None:
    bus = EventBus()
    PgListener("postgresql://127.0.0.1:1/none", "0" * 12, bus, load=lambda _id: None)  # never started
    bus.deliver(version(2))
    assert bus.cache.get(JOB.id) is not None
    assert bus.latest(JOB.id) is None, "served from the cache while changes elsewhere go unheard"
    bus.feed_restored()
    assert bus.cache.get(JOB.id) is None, "kept what may predate a missed change"
    bus.deliver(version(3))
    assert bus.latest(JOB.id) == version(3)


def test_observers_hear_every_change_and_one_failing_harms_no_other(caplog: pytest.LogCaptureFixture) -> None:
    """The worker pool observes the bus: local deliveries and changes elsewhere both reach it, and an
    observer that raises is logged while the others (and the watchers) still get the change."""
    bus = EventBus()
    heard: list[JobChange] = []

    def broken(_change: JobChange) -> None:
        raise RuntimeError("observer bug")

    bus.observe(broken)
    bus.observe(heard.append)
    bus.deliver(version(2))
    bus.changed_elsewhere(JobChange(JOB.id, 3, JobStatus.CANCELLED))
    assert heard == [JobChange(JOB.id, 2, JobStatus.PROCESSING), JobChange(JOB.id, 3, JobStatus.CANCELLED)]
    assert caplog.text.count("event observer failed") == 2
    assert bus.cache.get(JOB.id) is None, "a version known newer elsewhere is not served"
