"""Soak benchmark, load with faults: 500 creates from 50 tenants through two replicas over 60 s,
while one replica is SIGKILLed a few seconds after each start and started again.

    python bench/soak_bench.py                                # 500 creates, 50 tenants of 2,000 users, 60 s
    python bench/soak_bench.py --creates 100 --seconds 20     # shorter

The replicas share a fresh database on the PostgreSQL of tests/databases.py (USEREXPORT_TEST_POSTGRES)
and fake-gcs-server (tests/gcs_emulator.py). Each create carries a request_id; one that fails because
its replica died is sent again to the other, so it is the same job. After the window every accepted
job must end (no job stuck), none may fail, each completed file must hold its tenant's users once
and in order (tests/export_files.py, Job.sha256 too when set), and no job may exist twice. It prints
the outcome (tests/soak.py) and the table row of the README's figures; it exits 1 if any of that fails.
The suite runs the same code small (tests/integration/test_soak.py).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import soak  # noqa: E402
from tests.gcs_emulator import running_emulator  # noqa: E402
from tests.service_account import new_private_key, write_key_file  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--creates", type=int, default=500)
    parser.add_argument("--tenants", type=int, default=50)
    parser.add_argument("--users-per-tenant", type=int, default=2_000)
    parser.add_argument("--seconds", type=float, default=60.0, help="the window of creates and kills")
    parser.add_argument("--kill-every", type=float, default=4.0, help="seconds a replica runs before its SIGKILL")
    args = parser.parse_args()
    load = soak.Load(tenants=args.tenants, users_per_tenant=args.users_per_tenant, creates=args.creates,
                     fault_seconds=args.seconds, kill_every=args.kill_every)
    with tempfile.TemporaryDirectory(prefix="userexport-soak-") as folder, running_emulator("userexport-soak") as gcs:
        key = write_key_file(pathlib.Path(folder) / "service-account.json", new_private_key())
        outcome = soak.run(load, pathlib.Path(folder) / "shared", {
            "storage": "gcs", "gcs_bucket": gcs.bucket, "gcs_endpoint": gcs.endpoint,
            "gcs_credentials_file": str(key), "gcs_project": "soak"})
    print(outcome.summary())
    for job_id, found in outcome.bad_files.items():
        print(f"  {job_id}: {'; '.join(found)}")
    statuses = outcome.statuses()
    seconds = sorted(outcome.job_seconds) or [0.0]
    print(f"\n{os.cpu_count()} cores, PostgreSQL and fake-gcs-server on the same machine")
    print("| creates | accepted | refused | SIGKILLs | completed | failed | not ended | files whole | duplicate jobs "
          "| create to end p50 / p99 / max | peak RSS per replica |\n|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {load.creates} from {load.tenants} tenants over {outcome.window_seconds:.0f} s | {len(outcome.accepted)} "
          f"| {sum(outcome.refused.values())} ({', '.join(outcome.refused) or 'none'}) | {outcome.kills} "
          f"| {statuses['COMPLETED']} | {statuses['FAILED']} | {len(outcome.unended)} "
          f"| {len(outcome.finals) - len(outcome.bad_files)} of {len(outcome.finals)} | {len(outcome.duplicate_jobs)} "
          f"| {seconds[len(seconds) // 2]:.1f} / {seconds[int(len(seconds) * 0.99)]:.1f} / {seconds[-1]:.1f} s "
          f"| {', '.join(f'{peak:.0f} MB' for peak in outcome.peaks)} |")
    failed = outcome.unended or outcome.bad_files or outcome.duplicate_jobs or set(statuses) - {"COMPLETED"}
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
