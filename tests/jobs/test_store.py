"""The job store on real SQLite and PostgreSQL: claiming, leases, fencing of stale workers."""
from __future__ import annotations

import concurrent.futures
import datetime as dt
import pathlib
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine

from tests.databases import database_settings
from tests.harness import new_tenant
from userexport_server.db.engine import make_engine
from userexport_server.db.migrate import upgrade
from userexport_server.export.spec import ExportSpec, FieldSpec, Format
from userexport_server.export.sql import KeyRange
from userexport_server.jobs.events import EventBus
from userexport_server.jobs.model import Job, JobStatus
from userexport_server.jobs.slices import SliceStore
from userexport_server.jobs.store import JobStore, Limits

SPEC = ExportSpec(format=Format.CSV, fields=(FieldSpec("email"),))


@pytest.fixture
def engine(backend: str, tmp_path: pathlib.Path) -> Iterator[Engine]:
    with database_settings(backend) as settings:
        engine = make_engine(settings.get("database_url") or f"sqlite:///{tmp_path / 'jobs.db'}")
        upgrade(engine)
        yield engine
        engine.dispose()


def store(engine: Engine, **limits: object) -> JobStore:
    return JobStore(engine, EventBus(), Limits(**{"max_active_per_tenant": 100, **limits}))  # type: ignore[arg-type]


def test_concurrent_claims_never_share_a_job(engine: Engine) -> None:
    jobs = store(engine)
    created = {jobs.create(new_tenant(), SPEC, connection_name=None)[0].id for _ in range(12)}

    def claim_all(worker: int) -> list[str]:
        mine = []
        while (job := jobs.claim(f"worker-{worker}")) is not None:
            mine.append(job.id)
        return mine

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        claimed = [job_id for batch in pool.map(claim_all, range(4)) for job_id in batch]
    assert sorted(claimed) == sorted(created)  # each job exactly once


def test_a_lapsed_lease_is_claimed_again_and_the_old_worker_is_fenced_off(engine: Engine) -> None:
    jobs = store(engine, lease=dt.timedelta(seconds=0.5))
    tenant = new_tenant()
    created, _ = jobs.create(tenant, SPEC, connection_name=None)
    first = jobs.claim("replica-a")
    assert first is not None and first.id == created.id and first.attempts == 1
    assert jobs.claim("replica-b") is None  # the lease holds
    assert jobs.renew_lease(first)
    for _ in range(3):  # heartbeats alone keep the job, with no progress at all
        time.sleep(0.3)
        assert jobs.renew_lease(first)
        assert jobs.claim("replica-b") is None
    time.sleep(0.7)
    second = jobs.claim("replica-b")
    assert second is not None and second.id == created.id and second.attempts == 2
    assert jobs.release(first) is None and not jobs.lapse(first)  # the old worker is fenced off
    assert not jobs.renew_lease(first) and jobs.renew_lease(second)
    assert jobs.complete(first, storage_key="x", written=100) is None
    done = jobs.complete(second, storage_key=f"{tenant}/{created.id}/{tenant}.csv.gz", written=100)
    assert done is not None and done.status == JobStatus.COMPLETED


def test_cancel_fences_off_the_worker(engine: Engine) -> None:
    jobs = store(engine)
    tenant = new_tenant()
    created, _ = jobs.create(tenant, SPEC, connection_name=None)
    running = jobs.claim("w")
    assert running is not None
    cancelled = jobs.cancel(tenant, created.id)
    assert cancelled is not None and cancelled.status == JobStatus.CANCELLED
    assert jobs.release(running) is None
    assert jobs.complete(running, storage_key="k", written=2) is None
    assert jobs.get(tenant, created.id).status == JobStatus.CANCELLED  # type: ignore[union-attr]


def test_every_change_bumps_the_version_and_is_published(engine: Engine) -> None:
    bus = EventBus()
    published: list[Job] = []
    bus.deliver = published.append  # type: ignore[method-assign,assignment]
    jobs = JobStore(engine, bus)
    tenant = new_tenant()
    _created, _ = jobs.create(tenant, SPEC, connection_name=None)
    running = jobs.claim("w")
    assert running is not None
    running = SliceStore(jobs).plan(running, [KeyRange(None, None, 2)])
    assert running is not None
    jobs.complete(running, storage_key="k", written=2)
    assert [j.version for j in published] == [1, 2, 3, 4]
    assert [j.status for j in published] == [JobStatus.PENDING, JobStatus.PROCESSING, JobStatus.PROCESSING,
                                            JobStatus.COMPLETED]


def test_expired_jobs_are_purged_after_retention(engine: Engine) -> None:
    jobs = store(engine, job_ttl=dt.timedelta(seconds=0), expired_retention=dt.timedelta(seconds=0))
    tenant = new_tenant()
    created, _ = jobs.create(tenant, SPEC, connection_name=None)
    expired = jobs.expire_due()
    assert [j.id for j in expired] == [created.id] and expired[0].status == JobStatus.EXPIRED
    assert jobs.expire_due() == []  # once
    assert jobs.purge_expired() == 1
    assert jobs.get(tenant, created.id) is None
