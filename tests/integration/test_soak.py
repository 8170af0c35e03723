"""Load with faults, small (the full size is bench/soak_bench.py): creates from ten tenants through
two replicas while one is SIGKILLed three seconds after each start and restarted. Every accepted job ends, none
fails, each file holds its tenant's users once and in order, and no retried create made a second job."""
from __future__ import annotations

import pathlib

import pytest

from tests import soak
from tests.gcs_emulator import GcsEmulator, gcs_emulator_fixture  # noqa: F401  (registers `gcs_emulator`)
from tests.service_account import new_private_key, write_key_file

SMALL = soak.Load(tenants=10, users_per_tenant=1_000, creates=60, fault_seconds=20.0, kill_every=3.0,
                  settle_seconds=60.0)


@pytest.mark.parametrize("backend", ["postgresql"])  # replicas share a PostgreSQL database
def test_jobs_created_while_a_replica_is_killed_all_complete_whole(
        backend: str, gcs_emulator: GcsEmulator, tmp_path: pathlib.Path) -> None:
    key = write_key_file(tmp_path / "service-account.json", new_private_key())
    outcome = soak.run(SMALL, tmp_path / "shared", {
        "storage": "gcs", "gcs_bucket": gcs_emulator.bucket, "gcs_endpoint": gcs_emulator.endpoint,
        "gcs_credentials_file": str(key), "gcs_project": "test-project"})
    summary = outcome.summary()
    assert outcome.kills >= 2 and outcome.rescued >= 1, summary  # the kills hit running work
    assert outcome.accepted and not outcome.unended, summary
    assert set(outcome.statuses()) == {"COMPLETED"}, summary
    assert not outcome.bad_files and not outcome.duplicate_jobs, (summary, outcome.bad_files)
    assert set(outcome.refused) <= {"RESOURCE_EXHAUSTED"}, summary  # the tenant's active-job quota, nothing else
