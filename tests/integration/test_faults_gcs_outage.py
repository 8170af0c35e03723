"""The GCS emulator stopped mid-export, once a part's resumable upload is under way, and started again,
for real (the process ends, its port refuses connections; its objects are kept on disk, as GCS
keeps them, its upload sessions are not). The job ends: its slices' uploads
are retried (by the library, or the slice as a whole) and it completes whole, or it fails with a
message naming Cloud Storage. After the orphan sweep no object of the job is left but its file.
"""
from __future__ import annotations

import gzip
import json
import pathlib
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator

import pytest

from tests.databases import BACKENDS, fresh_postgres_database
from tests.gcs_emulator import GcsEmulator, running_emulator
from tests.harness import ServerHandle, new_tenant
from tests.integration.support import Caller
from tests.polling import eventually
from userexport.v1 import users_export_pb2 as pb

# GCS is the storage of replicas on PostgreSQL (the fault is the storage's: SQLite would add nothing).
pytestmark = pytest.mark.skipif("postgresql" not in BACKENDS, reason="GCS serves replicas on PostgreSQL")
# Two slices, each of whose parts (JSON, gzip level 1) is more than one 8 MiB upload chunk, so the
# outage lands in the middle of an upload session.
USERS = 120_000
DOWN_SECONDS = 3.0


@pytest.fixture
def emulator() -> Iterator[GcsEmulator]:
    with running_emulator(on_disk=True) as running:
        yield running


def objects(emulator: GcsEmulator, prefix: str) -> list[str]:
    url = f"{emulator.endpoint}/storage/v1/b/{emulator.bucket}/o?prefix={prefix}"
    with urllib.request.urlopen(url, timeout=10) as response:
        return sorted(item["name"] for item in json.load(response).get("items", []))


@pytest.fixture
def server(emulator: GcsEmulator, tmp_path: pathlib.Path) -> Iterator[ServerHandle]:
    with fresh_postgres_database() as url:
        handle = ServerHandle(tmp_path, database_url=url, storage="gcs", gcs_bucket=emulator.bucket,
                              gcs_endpoint=emulator.endpoint, gcs_project="test-project", slice_users=USERS // 2)
        yield handle
        handle.stop()


def test_an_export_survives_or_fails_clearly_when_gcs_goes_away_and_nothing_stray_remains(
        server: ServerHandle, emulator: GcsEmulator) -> None:
    tenant = new_tenant()
    server.seed(USERS, tenant=tenant)
    caller = Caller(server, tenant)
    job = caller.create(format=pb.ExportRequest.JSON)
    parts = "name=" + urllib.parse.quote(f"{tenant}/{job.id}/part-", safe="")
    eventually(lambda: parts in emulator.request_log(), "a part's upload under way", timeout=60, every=0.01)
    emulator.process.stop()
    assert caller.get(job.id).status == pb.Job.PROCESSING  # the outage is mid-export
    time.sleep(DOWN_SECONDS)
    emulator.process.start()
    final = caller.finish(job.id)
    server.app.reaper.sweep()
    left = objects(emulator, f"{tenant}/{job.id}/")
    if final.status == pb.Job.COMPLETED:
        assert left == [f"{tenant}/{job.id}/{tenant}.json.gz"]
        with urllib.request.urlopen(final.location, timeout=30) as response:
            lines = gzip.decompress(response.read()).splitlines()
        ids = [json.loads(line)["user_id"] for line in lines]
        assert len(ids) == final.users_written == USERS and ids == sorted(set(ids))
    else:
        assert final.status == pb.Job.FAILED and "Cloud Storage" in final.error, final
        assert left == []
