"""Chaos benchmark: a CSV and an NDJSON export of one tenant at once, over three replicas on
PostgreSQL with GCS storage, undisturbed and then under faults, both files checked user by user.

    python bench/chaos_bench.py                                   # 10,000,000 users
    python bench/chaos_bench.py --users 200000 --kill-every 5     # a quick check

Everything runs on this machine and is made by the benchmark: a PostgreSQL cluster of its own
(tests/pg_cluster.py: initdb into a temporary folder, on a free port, with the binaries of the
installed PostgreSQL, as the postgres user when run as root; fsync off), so restarting it disturbs
no other database; fake-gcs-server (tests/gcs_emulator.py) keeping its objects as files in a
temporary folder; three `userexport-server` processes sharing both, with --lease-seconds leases. It
seeds --users users (and prints the seed's users per second), then runs:

1. undisturbed: both exports created at once, timed until both are COMPLETED;
2. chaos: the same, while a replica is SIGKILLed every --kill-every seconds and restarted at once
   (in turn, never the paused one), PostgreSQL is restarted once (`pg_ctl restart -m fast`) at 30%
   of the undisturbed time, and one replica is stopped with SIGSTOP at 60% of it for the lease and
   5 s more, then continued.

Each file of the chaos run (and of the undisturbed one with --check-undisturbed) is downloaded and
read whole, two processes at once: every user of the table exactly once, in id order, the
count equal to the table's, and Job.sha256 (when the server sets it) equal to the downloaded
bytes' digest. It prints a table: the time of each run and their ratio (goal: at most 1.5x), the
files' check, and each replica's peak RSS (VmHWM polled from /proc every 0.5 s, over every process
that replica slot ran; goal: at most 250 MB).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import pathlib
import shutil
import sys
import tempfile
import threading
import time
import uuid
from typing import TypeVar

import psycopg

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.export_files import Ids, problems, read_export, table_ids  # noqa: E402
from tests.gcs_emulator import running_emulator  # noqa: E402
from tests.pg_cluster import PgCluster, server_bin  # noqa: E402
from tests.replicas import AnyReplica, Replicas  # noqa: E402
from tests.service_account import new_private_key, write_key_file  # noqa: E402
from userexport.v1 import users_export_pb2 as pb  # noqa: E402
from userexport_server.db.engine import make_engine  # noqa: E402
from userexport_server.db.migrate import upgrade  # noqa: E402
from userexport_server.seed import seed_users  # noqa: E402

TENANT = "chaos"
TERMINAL = {pb.Job.COMPLETED, pb.Job.FAILED, pb.Job.CANCELLED, pb.Job.EXPIRED}
FORMATS: dict[str, pb.ExportRequest.Format] = {"CSV": pb.ExportRequest.CSV, "NDJSON": pb.ExportRequest.JSON}
T = TypeVar("T")


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


def private_cluster() -> PgCluster:
    """A cluster of the benchmark's own (tests/pg_cluster.py), with room for ten million users: a
    larger buffer pool and WAL allowance, and WAL minimal (nothing replicates from it), so the
    seed's COPY into the emptied table writes none."""
    bin_dir = server_bin()
    if bin_dir is None:
        raise SystemExit("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin: apt-get install postgresql")
    cluster = PgCluster.create(bin_dir)
    for setting in ("shared_buffers = '512MB'", "max_wal_size = '8GB'", "wal_level = minimal", "max_wal_senders = 0"):
        cluster.execute(f"ALTER SYSTEM SET {setting}")
    cluster.restart("fast")
    return cluster


class Chaos(threading.Thread):
    """The faults of a chaos run, on a schedule from its start, until stopped."""

    def __init__(self, replicas: Replicas, postgres: PgCluster, kill_every: float, restart_at: float,
                 pause_at: float, pause_for: float) -> None:
        super().__init__(daemon=True)
        self.replicas, self.postgres = replicas, postgres
        self.kill_every, self.restart_at, self.pause_at, self.pause_for = kill_every, restart_at, pause_at, pause_for
        self.done = threading.Event()
        self.events: list[str] = []
        self.failure = ""

    def note(self, started: float, what: str) -> None:
        self.events.append(f"{time.monotonic() - started:6.1f} s {what}")
        log(f"chaos: {what}")

    def run(self) -> None:
        try:
            self._faults()
        except Exception as error:  # a replica that does not come back, a cluster that does not restart
            self.failure = f"{type(error).__name__}: {error}"
            log(f"chaos: the faults stopped: {self.failure}")
            self.replicas.resume()

    def _faults(self) -> None:
        started = time.monotonic()
        next_kill, slot, restarted, resume_at = self.kill_every, 0, False, None
        while not self.done.wait(0.2):
            now = time.monotonic() - started
            if resume_at is None and self.replicas.paused is None and now >= self.pause_at:
                paused = (slot + 1) % len(self.replicas.servers)
                self.replicas.pause(paused)
                resume_at = now + self.pause_for
                self.note(started, f"replica {paused} stopped (SIGSTOP) for {self.pause_for:.0f} s")
            elif resume_at is not None and self.replicas.paused is not None and now >= resume_at:
                self.note(started, f"replica {self.replicas.paused} continued (SIGCONT)")
                self.replicas.resume()
            if not restarted and now >= self.restart_at:
                restarted = True
                self.note(started, "PostgreSQL restarting (pg_ctl restart -m fast)")
                self.postgres.restart("fast")
                self.note(started, "PostgreSQL back")
            if now >= next_kill:
                next_kill += self.kill_every
                if slot == self.replicas.paused:
                    slot = (slot + 1) % len(self.replicas.servers)
                self.note(started, f"replica {slot} SIGKILLed, restarting")
                self.replicas.kill_and_restart(slot)
                self.note(started, f"replica {slot} restarted")
                slot = (slot + 1) % len(self.replicas.servers)
        self.replicas.resume()


@dataclasses.dataclass
class Run:
    name: str
    seconds: float
    per_format: dict[str, float]
    checks: dict[str, list[str]]
    notes: dict[str, str]
    faults: list[str]


def export_both(client: AnyReplica, name: str, chaos: Chaos | None, timeout: float) -> tuple[Run, dict[str, pb.Job]]:
    """Create the two exports at once, wait until both end (polling GetJob), while `chaos` runs."""
    started = time.monotonic()
    jobs = {label: client.create(pb.ExportRequest(format=fmt, request_id=f"{name}-{label}-{uuid.uuid4().hex[:8]}"))
            for label, fmt in FORMATS.items()}
    log(f"{name}: created {', '.join(f'{label} {job.id}' for label, job in jobs.items())}")
    if chaos is not None:
        chaos.start()
    ended: dict[str, float] = {}
    try:
        while len(ended) < len(jobs):
            if time.monotonic() - started > timeout:
                raise SystemExit(f"{name}: the exports did not end in {timeout:.0f} s: {jobs}")
            if chaos is not None and chaos.failure:
                raise SystemExit(f"{name}: the benchmark could not cause its faults: {chaos.failure}")
            time.sleep(1)
            for label, job in jobs.items():
                if label not in ended:
                    jobs[label] = client.get(job.id)
                    if jobs[label].status in TERMINAL:
                        ended[label] = time.monotonic() - started
                        log(f"{name}: {label} {pb.Job.Status.Name(jobs[label].status)} after {ended[label]:.1f} s "
                            f"({jobs[label].users_written:,} users) {jobs[label].error}")
    finally:
        if chaos is not None:
            chaos.done.set()
            chaos.join()
    seconds = max(ended.values())
    return Run(name, seconds, ended, {}, {}, chaos.events if chaos else []), jobs


def check_files(client: AnyReplica, run: Run, jobs: dict[str, pb.Job], table: Ids) -> None:
    """Download each file and compare it with the table (see tests/export_files.py), both at once
    in processes of their own (reading ten million users is a minute or more of Python each)."""
    started = time.monotonic()
    with concurrent.futures.ProcessPoolExecutor(len(jobs)) as pool:
        reading = {}
        for label, job in jobs.items():
            if job.status != pb.Job.COMPLETED:
                run.checks[label] = [f"job {job.id} ended {pb.Job.Status.Name(job.status)}: {job.error}"]
                continue
            fresh = client.get(job.id)  # a URL signed now
            reading[label] = (fresh, pool.submit(read_export, fresh.location, label == "NDJSON", 600))
        for label, (fresh, future) in reading.items():
            found = future.result()
            run.checks[label] = problems(found, table, fresh.sha256)
            run.notes[label] = "sha256 matches" if fresh.sha256 else "Job.sha256 empty, not checked"
            log(f"{run.name}: {label} file {found.size / 1e6:.0f} MB, {found.ids.count:,} users read in "
                f"{time.monotonic() - started:.0f} s: {'; '.join(run.checks[label]) or 'whole'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=10_000_000)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--kill-every", type=float, default=20.0, help="seconds between SIGKILLs (default 20)")
    parser.add_argument("--lease-seconds", type=float, default=10.0,
                        help="the replicas' USEREXPORT_LEASE_SECONDS (default 10; the server's default is 30)")
    parser.add_argument("--timeout", type=float, default=7200.0, help="seconds a run may take before it fails")
    parser.add_argument("--check-undisturbed", action="store_true",
                        help="read the undisturbed run's files too (the chaos run's are always read)")
    args = parser.parse_args()
    folder = pathlib.Path(tempfile.mkdtemp(prefix="userexport-chaos-"))
    postgres = None
    try:
        postgres = private_cluster()
        log(f"PostgreSQL {postgres.bin_dir.parent.name} on port {postgres.port}, data in {postgres.data}")
        postgres.execute("CREATE DATABASE chaos")
        dsn = postgres.url("chaos")
        engine = make_engine(dsn.replace("postgresql://", "postgresql+psycopg://", 1))
        upgrade(engine)
        cpu_before, started = postgres.cpu_seconds(), time.perf_counter()
        client_before = sum(os.times()[:2])
        seed_users(engine, tenant=TENANT, users=args.users,
                   progress=lambda done: log(f"seeding: {done:,} of {args.users:,}") if done % 1_000_000 == 0 else None)
        seed_seconds = time.perf_counter() - started
        seed_line = (f"seeded {args.users:,} users in {seed_seconds:.1f} s: {args.users / seed_seconds:,.0f} users/s "
                     f"(database CPU {postgres.cpu_seconds() - cpu_before:.0f} s, seeding process CPU "
                     f"{sum(os.times()[:2]) - client_before:.0f} s)")
        log(seed_line)
        engine.dispose()
        with psycopg.connect(dsn, autocommit=True) as vacuum:
            vacuum.execute("VACUUM (ANALYZE) users")  # what autovacuum does to a table in service (export_bench.py)
        table = table_ids(dsn, TENANT)
        log(f"table: {table.count:,} users")
        rows = run_all(args, postgres, dsn, folder, table)
    finally:
        if postgres is not None:
            postgres.stop()
            shutil.rmtree(postgres.root, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)
    print(f"\n{args.users:,} users, {args.replicas} replicas (2 workers each, slices of 100,000 users, leases "
          f"{args.lease_seconds:.0f} s), PostgreSQL and fake-gcs-server on the same {os.cpu_count()} cores; "
          f"{seed_line}")
    print("| run | CSV | NDJSON | both done | vs undisturbed | files | peak RSS per replica |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


def run_all(args: argparse.Namespace, postgres: PgCluster, dsn: str, folder: pathlib.Path, table: Ids) -> list[str]:
    """The undisturbed run, then the chaos run, on fresh replicas each; the table's rows."""
    key_file = write_key_file(folder / "service-account.json", new_private_key())
    rows, undisturbed = [], None
    with running_emulator("userexport-chaos", on_disk=True) as gcs:
        env = {"USEREXPORT_DATABASE_URL": dsn.replace("postgresql://", "postgresql+psycopg://", 1),
               "USEREXPORT_STORAGE": "gcs", "USEREXPORT_GCS_BUCKET": gcs.bucket,
               "USEREXPORT_GCS_ENDPOINT": gcs.endpoint, "USEREXPORT_GCS_CREDENTIALS_FILE": str(key_file),
               "USEREXPORT_GCS_PROJECT": "chaos", "USEREXPORT_LEASE_SECONDS": str(args.lease_seconds),
               "USEREXPORT_LOG_LEVEL": "INFO"}
        for name in ("undisturbed", "chaos"):
            replicas = Replicas(args.replicas, folder / name, env)
            try:
                client = AnyReplica(replicas, replicas.servers[0].token(TENANT))
                chaos = None
                if undisturbed is not None:
                    chaos = Chaos(replicas, postgres, args.kill_every, restart_at=0.3 * undisturbed.seconds,
                                  pause_at=0.6 * undisturbed.seconds, pause_for=args.lease_seconds + 5)
                run, jobs = export_both(client, name, chaos, args.timeout)
                replicas.sample()
                if chaos is not None or args.check_undisturbed:
                    check_files(client, run, jobs, table)
                for job in jobs.values():  # the emulator keeps files in memory
                    client.delete(job.id)
            finally:
                replicas.close()
            undisturbed = undisturbed or run
            verdict = "; ".join(f"{label}: {'; '.join(found) or 'every user once, in order, ' + run.notes[label]}"
                                for label, found in run.checks.items()) or "not read"
            rows.append(f"| {name} | {run.per_format['CSV']:.0f} s | {run.per_format['NDJSON']:.0f} s "
                        f"| {run.seconds:.0f} s | {run.seconds / undisturbed.seconds:.2f}x | {verdict} "
                        f"| {', '.join(f'{peak:.0f} MB' for peak in replicas.peaks)} |")
            if run.faults:
                log("faults:\n  " + "\n  ".join(run.faults))
    return rows


if __name__ == "__main__":
    main()
