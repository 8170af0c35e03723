"""Export benchmark: the service against the honest peer, on PostgreSQL and SQLite, in one invocation.

    python bench/export_bench.py                          # 1,000,000 users, both databases
    python bench/export_bench.py --users 200000 --backends sqlite
    python bench/export_bench.py --postgres postgresql://postgres@127.0.0.1:5432/postgres
    python bench/export_bench.py --users 10000000 --runs 1 --backends postgresql --no-peer   # peak RSS at 10M
    python bench/export_bench.py --workers 4 --slice-users 50000                               # other server settings
    python bench/export_bench.py --backends postgresql --formats csv,parquet                  # some formats only

For each database: seed N users in a fresh database, start the server as its own process (so its
peak RSS, VmHWM, is the service's alone), then run, interleaved and `--runs` times each, the
service's export (CreateJob until COMPLETED, default fields) and the peer: what a user could do
instead on the same data, with every core compressing at level 1:

- PostgreSQL CSV:    psql -c "COPY (default CSV columns) TO STDOUT (FORMAT csv, FORCE_QUOTE *)" | pigz -1 -p$(nproc)
- PostgreSQL NDJSON: psql -c "COPY (SELECT json_build_object(every root attribute)) TO STDOUT" | pigz ...
- SQLite CSV:        sqlite3 -csv db "SELECT default CSV columns" | pigz ...
- SQLite NDJSON:     sqlite3 db "SELECT json_object(every root attribute)" | pigz ...
- Parquet (whole user) has no one-line peer: it runs beside the CSV peer, and its wall time is
  also given over the service's CSV export's (the goal: no slower).

It prints medians of the wall time, the ratio service/peer (below 1: the service is faster), the
CPU-seconds the database spent (PostgreSQL: the bench database's backends, sampled from /proc every
20 ms, so a backend's last 20 ms may be missed), the server's CPU-seconds beside the peer's client
(psql or sqlite3, and pigz), and the server's peak RSS.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.databases import ADMIN_DSN  # noqa: E402
from tests.harness import ServerProcess  # noqa: E402
from tests.integration.support import Caller  # noqa: E402
from userexport.v1 import users_export_pb2 as pb  # noqa: E402
from userexport_server.db.engine import make_engine  # noqa: E402
from userexport_server.db.migrate import upgrade  # noqa: E402
from userexport_server.export.paths import ROOT_KINDS, Kind  # noqa: E402
from userexport_server.seed import seed_users  # noqa: E402

_PG_DATE = """to_char({c} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')"""
_CSV_ROOTS = ("user_id", "email", "email_verified", "username", "name", "given_name", "family_name", "nickname",
              "picture", "phone_number", "created_at", "updated_at", "last_login", "logins_count", "blocked")


_TICK = os.sysconf("SC_CLK_TCK")
FORMATS = {"csv": pb.ExportRequest.CSV, "json": pb.ExportRequest.JSON, "parquet": pb.ExportRequest.PARQUET}
LABELS = {"csv": "CSV, default fields", "json": "NDJSON, whole user",
          "parquet": "Parquet, whole user (peer: the CSV one)"}


def cpu_seconds(pid: int | str) -> float:
    """utime + stime of a process (all its threads), 0 when it is gone."""
    try:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


class DatabaseCpu:
    """CPU-seconds of the PostgreSQL backends serving one database (its name is in their process
    title), sampled in a thread so that backends which exit during a run are counted too."""

    def __init__(self, database: str | None) -> None:
        self._title = f" {database} ".encode() if database else None
        self._seen: dict[str, float] = {}
        self._stop = threading.Event()

    def _sample(self) -> None:
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    title = pathlib.Path(entry.path, "cmdline").read_bytes()
                except OSError:
                    continue
                if title.startswith(b"postgres: ") and self._title is not None and self._title in title:
                    self._seen[entry.name] = max(self._seen.get(entry.name, 0.0), cpu_seconds(entry.name))

    @contextmanager
    def measure(self) -> Iterator[list[float]]:
        """Yields a list that holds, after the block, the database's CPU-seconds in it."""
        result: list[float] = []
        if self._title is None:
            yield result
            result.append(float("nan"))
            return
        self._sample()
        before = dict(self._seen)
        self._stop.clear()

        def loop() -> None:
            while not self._stop.wait(0.02):
                self._sample()

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        try:
            yield result
        finally:
            self._stop.set()
            thread.join()
            self._sample()
            result.append(sum(v - before.get(pid, 0.0) for pid, v in self._seen.items()))


def peer_sql(backend: str, fmt: str, tenant: str) -> str:
    """The peer's SELECT: the service's default CSV columns, or every root attribute as one JSON object."""
    if fmt == "csv":
        date = _PG_DATE if backend == "postgresql" else "{c}"
        cols = [date.format(c=c) if ROOT_KINDS[c] is Kind.DATETIME else c for c in _CSV_ROOTS]
        cols.append("identities #>> '{0,connection}'" if backend == "postgresql"
                    else "identities ->> '$[0].connection'")
        select = ", ".join(cols)
    else:
        build = "json_build_object" if backend == "postgresql" else "json_object"
        # SQLite keeps JSON as text: json() makes it a value rather than a string.
        args = [f"'{name}', {f'json({name})' if backend == 'sqlite' and kind is Kind.JSON else name}"
                for name, kind in ROOT_KINDS.items()]
        select = f"{build}({', '.join(args)})"
    return f"SELECT {select} FROM users WHERE tenant = '{tenant}' ORDER BY user_id"


def peer_command(backend: str, fmt: str, tenant: str, target: str) -> str:
    """The shell pipeline of the peer; its output is counted, not kept."""
    sql = peer_sql(backend, fmt, tenant)
    if backend == "postgresql":
        options = " (FORMAT csv, FORCE_QUOTE *)" if fmt == "csv" else ""
        source = f"psql {shlex.quote(target)} -qAt -c {shlex.quote(f'COPY ({sql}) TO STDOUT{options}')}"
    else:
        source = f"sqlite3 {'-csv ' if fmt == 'csv' else ''}{shlex.quote(target)} {shlex.quote(sql)}"
    return f"{source} | pigz -1 -p{os.cpu_count() or 1} | wc -c"


class Run:
    """One timed run: wall seconds, database and client (server, or the peer's processes) CPU-seconds."""

    def __init__(self, wall: float, database: float, client: float) -> None:
        self.wall, self.database, self.client = wall, database, client


def run_peer(command: str, db_cpu: DatabaseCpu) -> tuple[Run, int]:
    children = lambda: sum(getattr(os.times(), f) for f in ("children_user", "children_system"))
    before = children()
    with db_cpu.measure() as database:
        started = time.perf_counter()
        out = subprocess.run(command, shell=True, check=True, capture_output=True, text=True).stdout
        wall = time.perf_counter() - started
    return Run(wall, database[0], children() - before), int(out.split()[0])


def run_service(server: ServerProcess, tenant: str, fmt: str, db_cpu: DatabaseCpu,
                **request: Any) -> tuple[Run, pb.Job]:
    """One export of the service (default fields, and `request`'s other fields): its run and final job."""
    caller = Caller(server, tenant)  # type: ignore[arg-type]
    before = cpu_seconds(server.process.pid)
    try:
        with db_cpu.measure() as database:
            started = time.perf_counter()
            job = caller.create(format=FORMATS[fmt], **request)
            final = caller.finish(job.id, timeout=3600)
            wall = time.perf_counter() - started
    finally:
        caller.close()
    if final.status != pb.Job.COMPLETED:
        raise SystemExit(f"export failed: {final.error}")
    return Run(wall, database[0], cpu_seconds(server.process.pid) - before), final


def ratio(ours: list[Run], theirs: list[Run], attribute: str) -> float:
    """Median of ours over median of theirs."""
    median = lambda runs: statistics.median([getattr(r, attribute) for r in runs])
    return float(median(ours) / median(theirs))


def median_cell(runs: list[Run], attribute: str, unit: str = " s") -> str:
    values = [getattr(r, attribute) for r in runs]
    return f"{statistics.median(values):.2f}{unit} ({min(values):.2f}-{max(values):.2f})"


def peak_rss_mb(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bench_backend(backend: str, users: int, runs: int, postgres: str, env: dict[str, str], *,
                  formats: list[str], peer: bool = True) -> list[str]:
    """Seed, serve (with the server settings `env`) and time one database; the table rows it measured."""
    data_dir = pathlib.Path(tempfile.mkdtemp(prefix=f"userexport-bench-{backend}-"))
    tenant = "bench" + uuid.uuid4().hex[:8]
    env = dict(env)
    dropdb: Callable[[], None] = lambda: None
    db_cpu = DatabaseCpu(None)
    if backend == "postgresql":
        import psycopg
        name = f"ue_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(postgres, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        dsn = f"{postgres.rsplit('/', 1)[0]}/{name}"
        url, target = dsn.replace("postgresql://", "postgresql+psycopg://", 1), dsn
        db_cpu = DatabaseCpu(name)
        env["USEREXPORT_DATABASE_URL"] = url

        def dropdb() -> None:
            with psycopg.connect(postgres, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    else:
        target = str(data_dir / "userexport.db")
        url = f"sqlite:///{target}"
    rows = []
    try:
        engine = make_engine(url)
        upgrade(engine)
        started = time.perf_counter()
        seed_users(engine, tenant=tenant, users=users)
        engine.dispose()
        if backend == "postgresql":
            # What autovacuum does to a table in service: without a visibility map the planning
            # queries (count, key ranges) read the heap instead of the index alone (1.3 -> 0.3
            # database CPU-s at 1M users), a cost only of a freshly loaded table.
            with psycopg.connect(target, autocommit=True) as vacuum:
                vacuum.execute("VACUUM (ANALYZE) users")
        print(f"{backend}: seeded {users:,} users in {time.perf_counter() - started:.1f} s", flush=True)
        server = ServerProcess(data_dir, env)
        try:
            walls: dict[str, list[Run]] = {}
            for fmt in formats:
                # Parquet has no one-line peer: it races the CSV peer, and the service's CSV below.
                command = peer_command(backend, "json" if fmt == "json" else "csv", tenant, target)
                service, peers = [], []
                for run in range(runs):  # interleaved, so load from elsewhere hits both alike
                    ours, final = run_service(server, tenant, fmt, db_cpu)
                    assert final.users_written == users, (final.users_written, users)
                    service.append(ours)
                    theirs, size = run_peer(command, db_cpu) if peer else (Run(*[float("nan")] * 3), 0)
                    peers.append(theirs)
                    print(f"  {backend} {fmt} run {run + 1}: service {ours.wall:.2f} s (db {ours.database:.2f}, "
                          f"server {ours.client:.2f} CPU-s), peer {theirs.wall:.2f} s (db {theirs.database:.2f}, "
                          f"client {theirs.client:.2f} CPU-s) ({size / 1e6:.0f} MB)", flush=True)
                walls[fmt] = service
                rows.append(f"| {backend} | {LABELS[fmt]} "
                            f"| {median_cell(service, 'wall')} | {median_cell(peers, 'wall')} "
                            f"| {ratio(service, peers, 'wall'):.2f}x "
                            f"| {median_cell(service, 'database', '')} | {median_cell(peers, 'database', '')} "
                            f"| {ratio(service, peers, 'database'):.2f}x | {median_cell(service, 'client', '')} "
                            f"| {median_cell(peers, 'client', '')} |")
            if "parquet" in walls and "csv" in walls:
                rows.append(f"| {backend} | Parquet wall / service CSV wall | "
                            f"{ratio(walls['parquet'], walls['csv'], 'wall'):.2f}x |")
            rows.append(f"| {backend} | server peak RSS | {peak_rss_mb(server.process.pid):.0f} MB |")
        finally:
            server.signal(2)
            server.wait(60)
    finally:
        dropdb()
        shutil.rmtree(data_dir, ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--backends", default="postgresql,sqlite")
    parser.add_argument("--postgres", default=ADMIN_DSN, help="admin DSN; the bench makes and drops its database")
    parser.add_argument("--gzip-level", default="1", help="the server's USEREXPORT_GZIP_LEVEL (default 1)")
    parser.add_argument("--workers", default="2", help="the server's USEREXPORT_WORKERS (default 2)")
    parser.add_argument("--slice-users", default="100000", help="the server's USEREXPORT_SLICE_USERS (default 100000)")
    parser.add_argument("--formats", default="csv,json,parquet", help="exports to time (csv, json, parquet)")
    parser.add_argument("--no-peer", action="store_true", help="time the service only (e.g. peak RSS at 10M users)")
    args = parser.parse_args()
    env = {"USEREXPORT_GZIP_LEVEL": args.gzip_level, "USEREXPORT_WORKERS": args.workers,
           "USEREXPORT_SLICE_USERS": args.slice_users}
    backends = [b for b in args.backends.split(",") if b]
    packages = {"pigz": "pigz", "psql": "postgresql-client", "sqlite3": "sqlite3"}
    needed = ["pigz", *(["psql"] if "postgresql" in backends else []), *(["sqlite3"] if "sqlite" in backends else [])]
    for tool in needed:
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed: apt-get install {packages[tool]}")
    rows = []
    for backend in backends:
        rows += bench_backend(backend, args.users, args.runs, args.postgres, env,
                             formats=[f for f in args.formats.split(",") if f], peer=not args.no_peer)
    print(f"\n{args.users:,} users, medians of {args.runs} (min-max), {os.cpu_count()} cores, peer with pigz -1 "
          f"-p{os.cpu_count()}, server {' '.join(f'{k}={v}' for k, v in env.items())}")
    print("| database | export | service wall | peer wall | wall ratio | service db CPU-s | peer db CPU-s | db ratio "
          "| server CPU-s | peer client CPU-s |\n|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
