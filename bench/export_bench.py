"""Export benchmark: the service against the honest peer, on PostgreSQL and SQLite, in one invocation.

    python bench/export_bench.py                          # 1,000,000 users, both databases
    python bench/export_bench.py --users 200000 --backends sqlite
    python bench/export_bench.py --postgres postgresql://postgres@127.0.0.1:5432/postgres
    python bench/export_bench.py --users 10000000 --runs 1 --backends postgresql --no-peer   # peak RSS at 10M
    python bench/export_bench.py --workers 4 --slice-users 50000                               # other server settings
    python bench/export_bench.py --csv-root-only --backends postgresql    # CSV of root columns: the COPY path

For each database: seed N users in a fresh database, start the server as its own process (so its
peak RSS, VmHWM, is the service's alone), then run, interleaved and `--runs` times each, the
service's export (CreateJob until COMPLETED, default fields) and the peer: what a user could do
instead on the same data, with every core compressing at level 1:

- PostgreSQL CSV:    psql -c "COPY (default CSV columns) TO STDOUT (FORMAT csv, FORCE_QUOTE *)" | pigz -1 -p$(nproc)
- PostgreSQL NDJSON: psql -c "COPY (SELECT json_build_object(every root attribute)) TO STDOUT" | pigz ...
- SQLite CSV:        sqlite3 -csv db "SELECT default CSV columns" | pigz ...
- SQLite NDJSON:     sqlite3 db "SELECT json_object(every root attribute)" | pigz ...

It prints medians, the ratio service/peer (below 1: the service is faster) and the server's peak RSS.
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
import time
import uuid
from collections.abc import Callable

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


def peer_sql(backend: str, fmt: str, tenant: str, root_only: bool = False) -> str:
    """The peer's SELECT: the service's default CSV columns (without the JSON path's when
    `root_only`), or every root attribute as one JSON object."""
    if fmt == "csv":
        date = _PG_DATE if backend == "postgresql" else "{c}"
        cols = [date.format(c=c) if ROOT_KINDS[c] is Kind.DATETIME else c for c in _CSV_ROOTS]
        if not root_only:
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


def peer_command(backend: str, fmt: str, tenant: str, target: str, root_only: bool = False) -> str:
    """The shell pipeline of the peer; its output is counted, not kept."""
    sql = peer_sql(backend, fmt, tenant, root_only)
    if backend == "postgresql":
        options = " (FORMAT csv, FORCE_QUOTE *)" if fmt == "csv" else ""
        source = f"psql {shlex.quote(target)} -qAt -c {shlex.quote(f'COPY ({sql}) TO STDOUT{options}')}"
    else:
        source = f"sqlite3 {'-csv ' if fmt == 'csv' else ''}{shlex.quote(target)} {shlex.quote(sql)}"
    return f"{source} | pigz -1 -p{os.cpu_count() or 1} | wc -c"


def run_peer(command: str) -> tuple[float, int]:
    started = time.perf_counter()
    out = subprocess.run(command, shell=True, check=True, capture_output=True, text=True).stdout
    return time.perf_counter() - started, int(out.split()[0])


def run_service(server: ServerProcess, tenant: str, fmt: str, root_only: bool = False) -> tuple[float, int]:
    caller = Caller(server, tenant)  # type: ignore[arg-type]
    fields = [(name, "") for name in _CSV_ROOTS] if fmt == "csv" and root_only else []
    try:
        started = time.perf_counter()
        job = caller.create(format=pb.ExportRequest.CSV if fmt == "csv" else pb.ExportRequest.JSON, fields=fields)
        final = caller.finish(job.id, timeout=3600)
        seconds = time.perf_counter() - started
    finally:
        caller.close()
    if final.status != pb.Job.COMPLETED:
        raise SystemExit(f"export failed: {final.error}")
    return seconds, final.users_written


def peak_rss_mb(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bench_backend(backend: str, users: int, runs: int, postgres: str, env: dict[str, str], *,
                  peer: bool = True, root_only: bool = False) -> list[str]:
    """Seed, serve (with the server settings `env`) and time one database; the table rows it measured."""
    data_dir = pathlib.Path(tempfile.mkdtemp(prefix=f"userexport-bench-{backend}-"))
    tenant = "bench" + uuid.uuid4().hex[:8]
    env = dict(env)
    dropdb: Callable[[], None] = lambda: None
    if backend == "postgresql":
        import psycopg
        name = f"ue_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(postgres, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        dsn = f"{postgres.rsplit('/', 1)[0]}/{name}"
        url, target = dsn.replace("postgresql://", "postgresql+psycopg://", 1), dsn
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
        print(f"{backend}: seeded {users:,} users in {time.perf_counter() - started:.1f} s", flush=True)
        server = ServerProcess(data_dir, env)
        try:
            for fmt in ("csv", "json"):
                command = peer_command(backend, fmt, tenant, target, root_only)
                service, peers = [], []
                for run in range(runs):  # interleaved, so load from elsewhere hits both alike
                    seconds, written = run_service(server, tenant, fmt, root_only)
                    assert written == users, (written, users)
                    service.append(seconds)
                    peer_seconds, size = run_peer(command) if peer else (float("nan"), 0)
                    peers.append(peer_seconds)
                    print(f"  {backend} {fmt} run {run + 1}: service {seconds:.2f} s, peer {peer_seconds:.2f} s "
                          f"({size / 1e6:.0f} MB)", flush=True)
                s, p = statistics.median(service), statistics.median(peers)
                csv_fields = "root columns of the default" if root_only else "default fields"
                rows.append(f"| {backend} | {f'CSV, {csv_fields}' if fmt == 'csv' else 'NDJSON, whole user'} "
                            f"| {s:.2f} s ({min(service):.2f}-{max(service):.2f}) "
                            f"| {p:.2f} s ({min(peers):.2f}-{max(peers):.2f}) | {s / p:.2f}x |")
            rows.append(f"| {backend} | server peak RSS | {peak_rss_mb(server.process.pid):.0f} MB | | |")
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
    parser.add_argument("--no-peer", action="store_true", help="time the service only (e.g. peak RSS at 10M users)")
    parser.add_argument("--csv-root-only", action="store_true",
                        help="CSV of the default fields without identities[0].connection (PostgreSQL's COPY path)")
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
        rows += bench_backend(backend, args.users, args.runs, args.postgres, env, peer=not args.no_peer,
                              root_only=args.csv_root_only)
    print(f"\n{args.users:,} users, medians of {args.runs} (min-max), {os.cpu_count()} cores, peer with pigz -1 "
          f"-p{os.cpu_count()}, server {' '.join(f'{k}={v}' for k, v in env.items())}")
    print("| database | export | service | peer | service/peer |\n|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
