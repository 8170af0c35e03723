"""A Parquet export in many slices run by two replicas (processes) sharing PostgreSQL and storage (a
shared folder, or a GCS bucket on the emulator): whichever replica finishes the last slice joins
parts written by both into one whole file, every user once, in user_id order."""
from __future__ import annotations

import hashlib
import io
import re
import signal
import urllib.request
from collections.abc import Iterator

import pyarrow.parquet as pq
import pytest

from tests.databases import BACKENDS, fresh_postgres_database
from tests.gcs_emulator import GcsEmulator, gcs_emulator_fixture  # noqa: F401  (registers `gcs_emulator`)
from tests.harness import ServerProcess, new_tenant
from tests.integration.support import Caller
from userexport.v1 import users_export_pb2 as pb
from userexport_server.db.engine import make_engine
from userexport_server.db.migrate import upgrade
from userexport_server.seed import seed_users

USERS = 60_000
SLICE_USERS = 2_000  # 30 slices

pytestmark = pytest.mark.skipif("postgresql" not in BACKENDS, reason="replicas share PostgreSQL")


@pytest.fixture(scope="module")
def postgres_with_users() -> Iterator[tuple[str, str]]:
    with fresh_postgres_database() as url:
        tenant = new_tenant()
        engine = make_engine(url)
        upgrade(engine)
        seed_users(engine, tenant=tenant, users=USERS)
        engine.dispose()
        yield url, tenant


def slices_done(log_text: str, job_id: str) -> set[int]:
    return {int(n) for n in re.findall(rf"slice done job_id={job_id} \S+ slice=(\d+) \S+ \S+ recorded=True", log_text)}


@pytest.mark.parametrize("storage", ["local", "gcs"])
def test_two_replicas_slices_join_into_one_whole_file_in_order(postgres_with_users, storage: str, tmp_path,
                                                               request: pytest.FixtureRequest) -> None:
    url, tenant = postgres_with_users
    env = {"USEREXPORT_DATABASE_URL": url, "USEREXPORT_SLICE_USERS": str(SLICE_USERS), "USEREXPORT_LOG_LEVEL": "INFO"}
    if storage == "gcs":
        emulator: GcsEmulator = request.getfixturevalue("gcs_emulator")
        env |= {"USEREXPORT_STORAGE": "gcs", "USEREXPORT_GCS_BUCKET": emulator.bucket,
                "USEREXPORT_GCS_ENDPOINT": emulator.endpoint, "USEREXPORT_GCS_PROJECT": "test-project"}
    data_dir = tmp_path / "shared"  # one secret, and on local storage one folder of files, as on a shared disk
    replicas = [ServerProcess(data_dir, env)]
    try:
        replicas.append(ServerProcess(data_dir, env))
        caller = Caller(replicas[0], tenant)  # type: ignore[arg-type]
        final = caller.finish(caller.create(format=pb.ExportRequest.PARQUET).id)
        assert final.status == pb.Job.COMPLETED, final.error
        by_each = [slices_done(replica.log_text(), final.id) for replica in replicas]
        assert all(by_each) and not by_each[0] & by_each[1], f"slices by replica: {by_each}"
        assert by_each[0] | by_each[1] == set(range(USERS // SLICE_USERS))
        with urllib.request.urlopen(final.location, timeout=30) as response:
            data = response.read()
        assert hashlib.sha256(data).hexdigest() == final.sha256 and len(data) == final.size_bytes
        whole = pq.ParquetFile(io.BytesIO(data))
        assert whole.num_row_groups == USERS // SLICE_USERS and whole.metadata.num_rows == USERS == final.users_written
        ids = whole.read(columns=["user_id"]).column("user_id").to_pylist()
        assert ids == sorted(ids) and len(set(ids)) == USERS
    finally:
        for replica in replicas:
            replica.signal(signal.SIGTERM)
            assert replica.wait(60) == 0
