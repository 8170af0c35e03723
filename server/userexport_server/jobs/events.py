"""Job events: every committed change of a job is published here and fanned out to its watchers.

Watchers live on the asyncio loop; publishers are worker threads and the loop itself, so delivery
goes through call_soon_threadsafe. No watcher ever polls the database.
"""
from __future__ import annotations

import asyncio
import threading
from collections import defaultdict

from userexport_server.jobs.model import Job


class Subscription:
    """One watcher's queue of job snapshots; close() (or leaving the `with`) frees it."""

    def __init__(self, bus: EventBus, job_id: str) -> None:
        self.job_id = job_id
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Job] = asyncio.Queue()
        self._bus = bus

    async def get(self) -> Job:
        return await self.queue.get()

    def close(self) -> None:
        self._bus._unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class EventBus:
    """In-process fan-out keyed by job id."""

    def __init__(self) -> None:
        self._subscriptions: dict[str, set[Subscription]] = defaultdict(set)
        self._lock = threading.Lock()

    def subscribe(self, job_id: str) -> Subscription:
        subscription = Subscription(self, job_id)
        with self._lock:
            self._subscriptions[job_id].add(subscription)
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

    def publish(self, job: Job) -> None:
        """Called after the change is committed; safe from any thread."""
        self.deliver(job)

    def deliver(self, job: Job) -> None:
        with self._lock:
            subscribers = list(self._subscriptions.get(job.id, ()))
        for subscription in subscribers:
            try:
                subscription.loop.call_soon_threadsafe(subscription.queue.put_nowait, job)
            except RuntimeError:  # the loop is closed: the server is shutting down
                pass

    def start(self) -> None:
        """Start background work (the PostgreSQL listener); nothing to do in process."""

    def healthy(self) -> str | None:
        """Why cross-replica events are not flowing, or None; in process they always flow."""
        return None

    def close(self) -> None:
        """Stop background work (the PostgreSQL listener); nothing to do in process."""
