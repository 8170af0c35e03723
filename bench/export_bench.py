"""Export benchmark: seed N users, export them as CSV and JSON through the running service, print figures.

    python bench/export_bench.py                       # 1,000,000 users on SQLite
    python bench/export_bench.py --users 200000        # smaller
    python bench/export_bench.py --database postgresql://postgres@127.0.0.1:5432/postgres
        # PostgreSQL: also times COPY ... TO STDOUT | gzip -6 and a plain SQLAlchemy+csv+gzip script

The server runs as its own process, so its peak RSS (VmHWM) is the service's alone.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

from sqlalchemy import text

from userexport.v1 import users_export_pb2 as pb

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.harness import ServerProcess  # noqa: E402
from tests.integration.support import Caller  # noqa: E402
from userexport_server.db.engine import make_engine  # noqa: E402
from userexport_server.db.migrate import upgrade  # noqa: E402
from userexport_server.seed import seed_users  # noqa: E402

CSV_COLUMNS_PG = """user_id, email, email_verified, username, name, given_name, family_name, nickname, picture,
  phone_number, to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'),
  to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'),
  to_char(last_login AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'), logins_count, blocked,
  identities #>> '{0,connection}'"""


def peak_rss_mb(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def export_through_service(server: ServerProcess, tenant: str, fmt: int) -> tuple[float, int, int]:
    caller = Caller(server, tenant)  # type: ignore[arg-type]
    started = time.perf_counter()
    job = caller.create(format=fmt)
    final = caller.finish(job.id)
    seconds = time.perf_counter() - started
    if final.status != pb.Job.COMPLETED:
        raise SystemExit(f"export failed: {final.error}")
    import urllib.request
    with urllib.request.urlopen(final.location) as response:
        size = len(response.read())
    caller.close()
    return seconds, final.users_written, size


def copy_baseline(url: str, tenant: str) -> float:
    """COPY (SELECT the same columns) TO STDOUT WITH CSV | gzip -6: the floor for a CSV export."""
    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    query = f"COPY (SELECT {CSV_COLUMNS_PG} FROM users WHERE tenant = '{tenant}' ORDER BY user_id) TO STDOUT WITH CSV"
    started = time.perf_counter()
    subprocess.run(f"psql '{dsn}' -qAt -c \"{query.replace(chr(34), chr(92) + chr(34))}\" | gzip -6 > /dev/null",
                   shell=True, check=True)
    return time.perf_counter() - started


def naive_script(url: str, tenant: str) -> float:
    """What one would write first: SQLAlchemy rows -> csv.writer -> gzip."""
    engine = make_engine(url)
    started = time.perf_counter()
    with engine.connect() as conn, gzip.open(os.devnull, "wt", compresslevel=6, newline="") as out:
        writer = csv.writer(out)
        result = conn.execution_options(stream_results=True, yield_per=10_000).execute(text(
            "SELECT user_id, email, email_verified, username, name, given_name, family_name, nickname, picture, "
            "phone_number, created_at, updated_at, last_login, logins_count, blocked, identities "
            "FROM users WHERE tenant = :t ORDER BY user_id"), {"t": tenant})
        for row in result:
            identities = row.identities or []
            writer.writerow([*row[:10], *(d.isoformat() if d else "" for d in row[10:13]), row.logins_count,
                             row.blocked, identities[0].get("connection") if identities else ""])
    engine.dispose()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--database", default="", help="SQLAlchemy URL of a PostgreSQL database (default SQLite)")
    parser.add_argument("--gzip-level", default="1",
                        help="the server's USEREXPORT_GZIP_LEVEL (default 1, as the server)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary data directory")
    args = parser.parse_args()

    data_dir = pathlib.Path(tempfile.mkdtemp(prefix="userexport-bench-"))
    tenant = "bench" + uuid.uuid4().hex[:8]
    url = args.database or f"sqlite:///{data_dir / 'userexport.db'}"
    engine = make_engine(url)
    upgrade(engine)
    started = time.perf_counter()
    seed_users(engine, tenant=tenant, users=args.users)
    seed_seconds = time.perf_counter() - started
    engine.dispose()
    backend = "postgresql" if args.database else "sqlite"
    print(f"seeded {args.users:,} users on {backend} in {seed_seconds:.1f} s ({args.users / seed_seconds:,.0f}/s)")

    env = {"USEREXPORT_GZIP_LEVEL": args.gzip_level}  # the server logs to a file in the data dir
    if args.database:
        env["USEREXPORT_DATABASE_URL"] = args.database
    server = ServerProcess(data_dir, env)
    try:
        for name, fmt in (("csv", pb.ExportRequest.CSV), ("json", pb.ExportRequest.JSON)):
            seconds, users, size = export_through_service(server, tenant, fmt)
            print(f"{backend} {name}: {users:,} users in {seconds:.2f} s = {users / seconds:,.0f} users/s, "
                  f"file {size / 1e6:.1f} MB gzip")
            if name == "csv":
                csv_seconds = seconds
        print(f"server peak RSS: {peak_rss_mb(server.process.pid):.0f} MB")
    finally:
        server.signal(2)
        server.wait(60)
    if args.database:
        floor = copy_baseline(url, tenant)
        print(f"COPY ... TO STDOUT WITH CSV | gzip -6: {floor:.2f} s; service/COPY ratio {csv_seconds / floor:.2f}")
        naive = naive_script(url, tenant)
        print(f"plain SQLAlchemy + csv + gzip script: {naive:.2f} s ({args.users / naive:,.0f} users/s)")
        cleanup = make_engine(url)
        with cleanup.begin() as conn:
            conn.execute(text("DELETE FROM jobs WHERE tenant = :t"), {"t": tenant})
            conn.execute(text("DELETE FROM users WHERE tenant = :t"), {"t": tenant})
            conn.execute(text("DELETE FROM connections WHERE tenant = :t"), {"t": tenant})
        cleanup.dispose()
    if not args.keep:
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
