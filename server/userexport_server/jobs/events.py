"""Job events: every committed change of a job is published here and fanned out to its watchers
and observers.

Watchers live on the asyncio loop; publishers are worker threads and the loop itself. A version
crosses to the loop once (one call_soon_threadsafe per loop, not per watcher) and is handed to each
watcher's subscription there. A subscription holds at most one pending version per status: newer
progress replaces older progress not yet sent, while status changes and the terminal version are
kept, so a watcher that reads slowly costs a few Job references and never slows the publisher.
The feed also keeps the JobCache current. No watcher ever polls the database.

Observers (the worker pool) hear of every change, here or on another replica, as a JobChange: a
job id, version and status, which is all a notification carries. On PostgreSQL the listener
(jobs/pg_events.py) brings other replicas' changes in and says whether the feed is whole
(feed_lost / feed_restored); in process it always is.
"""
from __future__ import annotations

import asyncio
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from userexport_server.jobs.cache import JobCache
from userexport_server.jobs.model import Job, JobStatus
from userexport_server.logs import EventLog

log = EventLog(__name__)


@dataclass(frozen=True, slots=True)
class JobChange:
    """A committed change, as every replica hears of it."""

    job_id: str
    version: int
    status: JobStatus


Observer = Callable[[JobChange], None]


class Draining(Exception):
    """The server is shutting down: the watcher has been given every version it had pending."""


class Subscription:
    """One watcher's coalescing queue of job versions; close() (or leaving the `with`) frees it.
    Slots, a list and a future made only while waiting keep an idle watcher to a few hundred bytes."""

    __slots__ = ("_bus", "_draining", "_newest", "_pending", "_waiter", "job_id", "loop")

    def __init__(self, bus: EventBus, job_id: str) -> None:
        self.job_id = job_id
        self.loop = asyncio.get_running_loop()
        self._pending: list[Job] = []  # at most one version per status run: a few
        self._newest = 0
        self._draining = False
        self._waiter: asyncio.Future[None] | None = None
        self._bus = bus

    def offer(self, job: Job) -> None:
        """On the loop: queue a version; an older or repeated one is dropped, and progress (same status
        as the last pending version, not terminal) replaces that version."""
        if job.version <= self._newest:
            return
        self._newest = job.version
        if self._pending and self._pending[-1].status == job.status and not job.status.is_terminal:
            self._pending[-1] = job
        else:
            self._pending.append(job)
        self._wake()

    def drain(self) -> None:
        """On the loop: after what is pending, get() raises Draining."""
        self._draining = True
        self._wake()

    async def get(self) -> Job:
        while not self._pending:
            if self._draining:
                raise Draining(self.job_id)
            self._waiter = self.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._pending.pop(0)

    def pending(self) -> int:
        return len(self._pending)

    def close(self) -> None:
        self._bus._unsubscribe(self)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class EventBus:
    """In-process fan-out keyed by job id. `feed_problem` is why changes elsewhere may go unheard
    until the feed starts (a listener not yet listening), or None when nothing else writes jobs."""

    def __init__(self, feed_problem: str | None = None) -> None:
        self._subscriptions: dict[str, set[Subscription]] = defaultdict(set)
        self._lock = threading.Lock()
        self._draining = False
        self._observers: list[Observer] = []
        self._feed_problem = feed_problem
        self.cache = JobCache()

    def observe(self, observer: Observer) -> None:
        """Call `observer` with every change, in the thread that delivers it; it must be quick and
        its errors are logged, never raised to the writer."""
        self._observers.append(observer)

    def subscribe(self, job_id: str) -> Subscription:
        subscription = Subscription(self, job_id)
        with self._lock:
            self._subscriptions[job_id].add(subscription)
            if self._draining:
                subscription.drain()
        return subscription

    def _unsubscribe(self, subscription: Subscription) -> None:
        with self._lock:
            subscribers = self._subscriptions.get(subscription.job_id)
            if subscribers is not None:
                subscribers.discard(subscription)
                if not subscribers:
                    del self._subscriptions[subscription.job_id]

    def watcher_count(self, job_id: str | None = None) -> int:
        with self._lock:
            if job_id is not None:
                return len(self._subscriptions.get(job_id, ()))
            return sum(len(s) for s in self._subscriptions.values())

    def watched(self) -> list[str]:
        """The ids of the jobs watched here."""
        with self._lock:
            return list(self._subscriptions)

    def deliver(self, job: Job) -> None:
        """Hand a committed version to the cache, its watchers' loops and the observers, from any thread."""
        self.cache.offer(job)
        self._notify(JobChange(job.id, job.version, job.status))
        with self._lock:
            loops = {subscription.loop for subscription in self._subscriptions.get(job.id, ())}
        for loop in loops:
            try:
                loop.call_soon_threadsafe(self._fan_out, loop, job)
            except RuntimeError:  # the loop is closed: the server is shutting down
                pass

    def changed_elsewhere(self, change: JobChange) -> None:
        """Another replica committed `change`: what the cache holds is older, and observers hear of it
        (the job itself reaches watchers through deliver, once read)."""
        self.cache.outdate(change.job_id, change.version)
        self._notify(change)

    def _notify(self, change: JobChange) -> None:
        for observer in self._observers:
            try:
                observer(change)
            except Exception:
                log.exception("event observer failed", job_id=change.job_id, version=change.version)

    def _fan_out(self, loop: asyncio.AbstractEventLoop, job: Job) -> None:
        with self._lock:
            subscribers = [s for s in self._subscriptions.get(job.id, ()) if s.loop is loop]
        for subscription in subscribers:
            subscription.offer(job)

    def drain(self) -> None:
        """Shutting down: every watcher, present or future, is sent what it has pending and then told
        to go (its stream ends UNAVAILABLE, and the client watches again elsewhere). From any thread."""
        with self._lock:
            self._draining = True
            subscribers = [s for group in self._subscriptions.values() for s in group]
        for subscription in subscribers:
            try:
                subscription.loop.call_soon_threadsafe(subscription.drain)
            except RuntimeError:
                pass

    def latest(self, job_id: str) -> Job | None:
        """The job at its newest version if the feed vouches for it (see JobCache), else None."""
        return self.cache.get(job_id) if self.healthy() is None else None

    def feed_lost(self, problem: str) -> None:
        """Changes elsewhere may now go unheard: the cache is bypassed until feed_restored."""
        self._feed_problem = problem

    def feed_restored(self) -> None:
        """The feed is whole again, but changes made meanwhile were not heard: forget what is cached."""
        self.cache.clear()
        self._feed_problem = None

    def healthy(self) -> str | None:
        """Why changes made elsewhere may not be heard, or None."""
        return self._feed_problem
