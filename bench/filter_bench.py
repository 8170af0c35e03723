"""Filter benchmark: filtered exports of about 10% of the users against the full export, on PostgreSQL.

    python bench/filter_bench.py                    # 1,000,000 users, 3 runs of each
    python bench/filter_bench.py --users 200000 --runs 5

Seeds N users in a fresh database (then VACUUM ANALYZE, as autovacuum would), starts the server as its
own process, and runs interleaved, `--runs` times each, three CSV exports (default fields) until
COMPLETED: the whole tenant; `created_at > <its 90th percentile>` (about 10%, read through the
(tenant, created_at) index; `>` keeps it under 100,000 users at 1M, one slice, where `>=` gives
100,001, a second slice of one user and a pass to find its boundary); and `logins_count >= 1 AND
logins_count <= 58` (about 10%, no index: every user of the tenant is read and checked). It
prints medians of the wall time, the database's CPU-seconds (its backends, sampled as in
export_bench.py) and the server's, and each filtered export's wall time and CPU as a share of the
full export's (the goal: at most 20% of its wall time for the indexed range).
"""
from __future__ import annotations

import argparse
import pathlib
import shutil
import statistics
import sys
import tempfile
import time
import uuid

import psycopg

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.export_bench import DatabaseCpu, Run, cpu_seconds, median_cell  # noqa: E402
from tests.databases import ADMIN_DSN  # noqa: E402
from tests.harness import ServerProcess  # noqa: E402
from tests.integration.support import Caller  # noqa: E402
from userexport.v1 import users_export_pb2 as pb  # noqa: E402
from userexport_server.db.engine import make_engine  # noqa: E402
from userexport_server.db.migrate import upgrade  # noqa: E402
from userexport_server.seed import seed_users  # noqa: E402


def run_export(server: ServerProcess, tenant: str, filter: str | None, db_cpu: DatabaseCpu) -> tuple[Run, int]:
    caller = Caller(server, tenant)  # type: ignore[arg-type]
    before = cpu_seconds(server.process.pid)
    try:
        with db_cpu.measure() as database:
            started = time.perf_counter()
            job = caller.create(format=pb.ExportRequest.CSV, filter=filter)
            final = caller.finish(job.id, timeout=3600)
            wall = time.perf_counter() - started
    finally:
        caller.close()
    if final.status != pb.Job.COMPLETED:
        raise SystemExit(f"export failed: {final.error}")
    return Run(wall, database[0], cpu_seconds(server.process.pid) - before), final.users_written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--postgres", default=ADMIN_DSN, help="admin DSN; the bench makes and drops its database")
    args = parser.parse_args()
    env = {"USEREXPORT_GZIP_LEVEL": "1", "USEREXPORT_WORKERS": "2", "USEREXPORT_SLICE_USERS": "100000"}
    name = f"ue_bench_{uuid.uuid4().hex[:8]}"
    dsn = f"{args.postgres.rsplit('/', 1)[0]}/{name}"
    env["USEREXPORT_DATABASE_URL"] = dsn.replace("postgresql://", "postgresql+psycopg://", 1)
    data_dir = pathlib.Path(tempfile.mkdtemp(prefix="userexport-filter-bench-"))
    tenant = "bench" + uuid.uuid4().hex[:8]
    with psycopg.connect(args.postgres, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        engine = make_engine(env["USEREXPORT_DATABASE_URL"])
        upgrade(engine)
        started = time.perf_counter()
        seed_users(engine, tenant=tenant, users=args.users)
        engine.dispose()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("VACUUM (ANALYZE) users")
            cut = conn.execute("SELECT percentile_disc(0.9) WITHIN GROUP (ORDER BY created_at) FROM users "
                               "WHERE tenant = %s", (tenant,)).fetchone()
        assert cut is not None
        print(f"seeded {args.users:,} users in {time.perf_counter() - started:.1f} s", flush=True)
        exports: dict[str, str | None] = {
            "full": None,
            "created_at range (index)": f'created_at > "{cut[0].isoformat()}"',
            "logins_count range (no index)": "logins_count >= 1 AND logins_count <= 58",
        }
        results: dict[str, list[Run]] = {label: [] for label in exports}
        written: dict[str, int] = {}
        server = ServerProcess(data_dir, env)
        db_cpu = DatabaseCpu(name)
        try:
            for run in range(args.runs):  # interleaved, so load from elsewhere hits all alike
                for label, filter in exports.items():
                    result, written[label] = run_export(server, tenant, filter, db_cpu)
                    results[label].append(result)
                    print(f"  run {run + 1} {label}: {written[label]:,} users, {result.wall:.2f} s "
                          f"(db {result.database:.2f}, server {result.client:.2f} CPU-s)", flush=True)
        finally:
            server.signal(2)
            server.wait(60)
    finally:
        with psycopg.connect(args.postgres, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        shutil.rmtree(data_dir, ignore_errors=True)
    full = {a: statistics.median(getattr(r, a) for r in results["full"]) for a in ("wall", "database", "client")}
    print(f"\n{args.users:,} users on PostgreSQL, CSV default fields, medians of {args.runs} (min-max), "
          f"server {' '.join(f'{k}={v}' for k, v in env.items() if k != 'USEREXPORT_DATABASE_URL')}")
    print("| export | filter | users | wall | db CPU-s | server CPU-s | wall, db, server / full |\n"
          "|---|---|---|---|---|---|---|")
    for label, runs in results.items():
        shares = "/".join(f"{statistics.median(getattr(r, a) for r in runs) / full[a]:.0%}"
                          for a in ("wall", "database", "client"))
        print(f"| {label} | {f'`{exports[label]}`' if exports[label] else ''} | {written[label]:,} "
              f"| {median_cell(runs, 'wall')} | {median_cell(runs, 'database', '')} "
              f"| {median_cell(runs, 'client', '')} | {shares} |")


if __name__ == "__main__":
    main()
