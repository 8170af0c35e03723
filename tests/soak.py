"""Load with faults: many creates from many tenants through two replicas while one of them is
SIGKILLed every few seconds and restarted; then every accepted job must end, its file whole.

The soak test (tests/integration/test_soak.py) runs it small; bench/soak_bench.py at full size
(500 creates from 50 tenants over 60 s) and prints the figures.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import pathlib
import random
import statistics
import threading
import time
from collections import Counter

import grpc
import psycopg

from tests.databases import fresh_postgres_database
from tests.export_files import Ids, problems, read_export, table_ids
from tests.replicas import AnyReplica, Replicas
from userexport.v1 import users_export_pb2 as pb
from userexport_server.db.engine import make_engine
from userexport_server.db.migrate import upgrade
from userexport_server.seed import seed_users

TERMINAL = {pb.Job.COMPLETED, pb.Job.FAILED, pb.Job.CANCELLED, pb.Job.EXPIRED}


@dataclasses.dataclass(frozen=True)
class Load:
    tenants: int = 50
    users_per_tenant: int = 2_000
    creates: int = 500
    replicas: int = 2
    fault_seconds: float = 60.0  # creates are spread over this window, and the kills happen in it
    kill_every: float = 4.0  # seconds replica 0 runs after each start before it is SIGKILLed (_kill_until)
    settle_seconds: float = 300.0  # how long every accepted job gets to end after the window
    lease_seconds: float = 3.0
    callers: int = 8  # concurrent clients making the creates


@dataclasses.dataclass
class Outcome:
    """What happened: creates accepted or refused (by reason), jobs by final status, files with
    problems, jobs still not ended, duplicates, and the times the figures are made of."""

    load: Load
    accepted: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)  # request_id -> (tenant, job id)
    refused: Counter[str] = dataclasses.field(default_factory=Counter)
    finals: dict[str, pb.Job] = dataclasses.field(default_factory=dict)
    bad_files: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    unended: list[str] = dataclasses.field(default_factory=list)
    duplicate_jobs: list[str] = dataclasses.field(default_factory=list)
    job_seconds: list[float] = dataclasses.field(default_factory=list)
    kills: int = 0
    rescued: int = 0  # claims of a job or slice that a killed replica had been running
    retried_calls: int = 0
    window_seconds: float = 0.0
    settle_seconds: float = 0.0
    peaks: list[float] = dataclasses.field(default_factory=list)

    def statuses(self) -> Counter[str]:
        return Counter(pb.Job.Status.Name(job.status) for job in self.finals.values())

    def summary(self) -> str:
        seconds = sorted(self.job_seconds) or [0.0]
        return (f"{self.load.creates} creates from {self.load.tenants} tenants through {self.load.replicas} replicas "
                f"in {self.window_seconds:.0f} s, {self.kills} SIGKILLs: {len(self.accepted)} accepted, refused "
                f"{dict(self.refused) or 0}; final {dict(self.statuses())}; {len(self.unended)} not ended "
                f"{self.settle_seconds:.0f} s after the window; files checked {len(self.finals) - len(self.bad_files)}"
                f" whole, {len(self.bad_files)} not; {len(self.duplicate_jobs)} duplicate jobs; create to end p50 "
                f"{statistics.median(seconds):.1f} s, p99 {seconds[int(len(seconds) * 0.99)]:.1f} s, max "
                f"{seconds[-1]:.1f} s; {self.rescued} claims rescued from a killed replica, {self.retried_calls} "
                f"calls retried on the other replica")


def run(load: Load, data_dir: pathlib.Path, gcs: dict[str, str]) -> Outcome:
    """Seed the tenants in a fresh database, start the replicas (GCS settings `gcs`, as
    USEREXPORT_* names), make the creates while SIGKILLing replica 0 mid-work some `kill_every`
    seconds after each of its starts and starting it again, wait for every accepted job, and check
    each completed file against its tenant's users."""
    outcome = Outcome(load)
    with fresh_postgres_database() as dsn:
        engine = make_engine(dsn)
        upgrade(engine)
        tenants = [f"soak{n:03d}" for n in range(load.tenants)]
        for tenant in tenants:
            seed_users(engine, tenant=tenant, users=load.users_per_tenant)
        engine.dispose()
        env = {"USEREXPORT_DATABASE_URL": dsn, "USEREXPORT_LEASE_SECONDS": str(load.lease_seconds),
               "USEREXPORT_LOG_LEVEL": "INFO", **{f"USEREXPORT_{k.upper()}": v for k, v in gcs.items()}}
        replicas = Replicas(load.replicas, data_dir, env)
        try:
            clients = {t: AnyReplica(replicas, replicas.servers[0].token(t), patience=120) for t in tenants}
            created_at: dict[str, float] = {}
            started = time.monotonic()
            stop = threading.Event()
            killer = threading.Thread(target=_kill_until, args=(replicas, load.kill_every, stop), daemon=True)
            killer.start()
            try:
                _create_all(load, tenants, clients, outcome, created_at, started)
            finally:
                stop.set()
                killer.join()
            outcome.window_seconds = time.monotonic() - started
            _settle(load, clients, outcome, created_at)
            outcome.settle_seconds = time.monotonic() - started - outcome.window_seconds
            outcome.kills, outcome.retried_calls = replicas.kills, sum(c.retries for c in clients.values())
            outcome.rescued = replicas.log_text().count("rescued=True")
            outcome.duplicate_jobs = _duplicate_jobs(dsn, tenants, outcome)
            _check_files(dsn, clients, outcome)
        finally:
            replicas.close()
            outcome.peaks = replicas.peaks
    return outcome


def _kill_until(replicas: Replicas, every: float, stop: threading.Event) -> None:
    """Replica 0 runs `every` seconds, then is SIGKILLed the moment it next claims a job or a slice
    (or `every` seconds later, if it claims none), so a kill lands on running work."""
    while not stop.wait(every):
        claims = replicas.servers[0].log_text().count(" claimed ")
        give_up = time.monotonic() + every
        while (not stop.is_set() and time.monotonic() < give_up
               and replicas.servers[0].log_text().count(" claimed ") == claims):
            time.sleep(0.02)
        replicas.kill_and_restart(0)


def _create_all(load: Load, tenants: list[str], clients: dict[str, AnyReplica], outcome: Outcome,
                created_at: dict[str, float], started: float) -> None:
    """The creates, at an even pace over the window, from `callers` threads; each has a request_id,
    so one retried after a replica died is the same job."""
    shuffle = random.Random(0)
    plan = [(tenants[n % len(tenants)], f"soak-{n:04d}", shuffle.choice((pb.ExportRequest.CSV, pb.ExportRequest.JSON)))
            for n in range(load.creates)]
    lock = threading.Lock()

    def create(n: int) -> None:
        tenant, request_id, fmt = plan[n]
        delay = started + n * load.fault_seconds / load.creates - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        try:
            job = clients[tenant].create(pb.ExportRequest(format=fmt, request_id=request_id))
        except grpc.RpcError as error:
            with lock:
                outcome.refused[error.code().name] += 1
            return
        with lock:
            outcome.accepted[request_id] = (tenant, job.id)
            created_at.setdefault(job.id, time.monotonic())

    with concurrent.futures.ThreadPoolExecutor(load.callers) as pool:
        list(pool.map(create, range(load.creates)))


def _settle(load: Load, clients: dict[str, AnyReplica], outcome: Outcome, created_at: dict[str, float]) -> None:
    """Poll the accepted jobs until each has ended or `settle_seconds` pass."""
    deadline = time.monotonic() + load.settle_seconds
    waiting = {job_id: tenant for tenant, job_id in outcome.accepted.values()}
    while waiting and time.monotonic() < deadline:
        for job_id, tenant in list(waiting.items()):
            job = clients[tenant].get(job_id)
            if job.status in TERMINAL:
                outcome.finals[job_id] = job
                outcome.job_seconds.append(time.monotonic() - created_at[job_id])
                del waiting[job_id]
        time.sleep(0.5)
    outcome.unended = sorted(waiting)


def _duplicate_jobs(dsn: str, tenants: list[str], outcome: Outcome) -> list[str]:
    """Jobs in the database beyond the accepted ones (a retried create that made a second job)."""
    with psycopg.connect(dsn) as conn:
        ids = {row[0] for row in conn.execute("SELECT id FROM jobs WHERE tenant = ANY(%s)", (tenants,))}
    return sorted(ids - {job_id for _, job_id in outcome.accepted.values()})


def _check_files(dsn: str, clients: dict[str, AnyReplica], outcome: Outcome) -> None:
    """Every completed job's file against its tenant's users (see tests/export_files.py)."""
    tables: dict[str, Ids] = {}
    tenant_of = {job_id: tenant for tenant, job_id in outcome.accepted.values()}
    for job_id, job in outcome.finals.items():
        tenant = tenant_of[job_id]
        if job.status != pb.Job.COMPLETED:
            outcome.bad_files[job_id] = [f"{pb.Job.Status.Name(job.status)}: {job.error}"]
            continue
        if tenant not in tables:
            tables[tenant] = table_ids(dsn, tenant)
        fresh = clients[tenant].get(job_id)  # a URL signed now
        found = problems(read_export(fresh.location, json_lines=fresh.format == pb.ExportRequest.JSON),
                         tables[tenant], fresh.sha256)
        if found:
            outcome.bad_files[job_id] = found
