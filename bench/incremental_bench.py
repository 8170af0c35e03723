"""Incremental export benchmark: an export changed_since a watermark against a full export, on PostgreSQL.

    python bench/incremental_bench.py                         # 1,000,000 users, 10,000 changes, 3 runs
    python bench/incremental_bench.py --users 200000 --changes 2000 --runs 1

Seeds N users in a fresh database (USEREXPORT_TEST_POSTGRES, as the tests), VACUUM ANALYZEs the users
and their change log as autovacuum would, starts the server as its own process, then `--runs` times:
a full NDJSON export (whole users), `--changes` random changes made by churn (80% updates, 10%
deletes, 10% inserts), and the NDJSON export changed_since the full export's watermark. It prints
the medians of the wall time and of the CPU-seconds of the database's backends (sampled from /proc,
see export_bench.DatabaseCpu) of both, and the increment's share of the full export's (goal: at most
10% of each).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402

from bench.export_bench import DatabaseCpu, Run, median_cell, run_service  # noqa: E402
from tests.databases import fresh_postgres_database  # noqa: E402
from tests.harness import ServerProcess  # noqa: E402
from userexport_server.churn import churn  # noqa: E402
from userexport_server.db.engine import make_engine  # noqa: E402
from userexport_server.db.migrate import upgrade  # noqa: E402
from userexport_server.seed import seed_users  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--changes", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    tenant = "bench" + uuid.uuid4().hex[:8]
    data_dir = pathlib.Path(tempfile.mkdtemp(prefix="userexport-bench-incremental-"))
    full: list[Run] = []
    incremental: list[Run] = []
    try:
        with fresh_postgres_database() as dsn:
            engine = make_engine(dsn)
            upgrade(engine)
            started = time.perf_counter()
            seed_users(engine, tenant=tenant, users=args.users)
            print(f"seeded {args.users:,} users in {time.perf_counter() - started:.1f} s", flush=True)
            with psycopg.connect(dsn, autocommit=True) as vacuum:
                vacuum.execute("VACUUM (ANALYZE) users")
                vacuum.execute("VACUUM (ANALYZE) user_changes")
            db_cpu = DatabaseCpu(dsn.rsplit("/", 1)[1])
            server = ServerProcess(data_dir, {"USEREXPORT_DATABASE_URL": dsn})
            try:
                for run in range(args.runs):
                    whole, baseline = run_service(server, tenant, "json", db_cpu)
                    started = time.perf_counter()
                    deletes = inserts = args.changes // 10
                    churn(engine, tenant=tenant, updates=args.changes - deletes - inserts, deletes=deletes,
                          inserts=inserts, rng=random.Random(run))
                    churned = time.perf_counter() - started
                    part, increment = run_service(server, tenant, "json", db_cpu, changed_since=baseline.watermark)
                    full.append(whole)
                    incremental.append(part)
                    print(f"  run {run + 1}: full {whole.wall:.2f} s (db {whole.database:.2f} CPU-s, "
                          f"{baseline.users_written:,} users), {args.changes:,} changes in {churned:.1f} s, "
                          f"incremental {part.wall:.2f} s (db {part.database:.2f} CPU-s, "
                          f"{increment.users_written:,} users)", flush=True)
            finally:
                server.signal(2)
                server.wait(60)
                engine.dispose()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    share = lambda attribute: statistics.median(getattr(r, attribute) for r in incremental) / \
        statistics.median(getattr(r, attribute) for r in full)
    print(f"\n{args.users:,} users, {args.changes:,} changes, NDJSON, medians of {args.runs} (min-max), "
          f"{os.cpu_count()} cores")
    print("| export | wall | database CPU-s | server CPU-s |\n|---|---|---|---|")
    for name, runs in (("full", full), (f"changed_since, {args.changes:,} changes", incremental)):
        print(f"| {name} | {median_cell(runs, 'wall')} | {median_cell(runs, 'database', '')} "
              f"| {median_cell(runs, 'client', '')} |")
    print(f"| increment / full | {share('wall'):.1%} | {share('database'):.1%} | {share('client'):.1%} |")


if __name__ == "__main__":
    main()
