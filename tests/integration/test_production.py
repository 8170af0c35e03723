"""Production shape: exports into GCS (a real fake-gcs-server) with V4 signed URLs, and several replicas
on one PostgreSQL database that survive the loss of the replica running an export."""
from __future__ import annotations

import datetime as dt
import gzip
import json
import re
import signal
import threading
import urllib.request

import pytest

from tests.databases import fresh_postgres_database
from tests.gcs_emulator import GcsEmulator, gcs_emulator_fixture  # noqa: F401  (registers `gcs_emulator`)
from tests.harness import ServerProcess, new_tenant
from tests.integration.support import Caller, http_status
from tests.polling import eventually
from tests.service_account import new_private_key, verify_v4_url, write_key_file
from userexport.client.api import UsersExportClient
from userexport.v1 import users_export_pb2 as pb
from userexport_server.db.engine import make_engine
from userexport_server.db.migrate import upgrade
from userexport_server.seed import seed_users


@pytest.fixture(scope="module")
def signing_key():
    return new_private_key()


@pytest.fixture
def gcs_settings(gcs_emulator: GcsEmulator, signing_key, tmp_path) -> dict[str, str]:
    key_file = write_key_file(tmp_path / "service-account.json", signing_key)
    return {"storage": "gcs", "gcs_bucket": gcs_emulator.bucket, "gcs_endpoint": gcs_emulator.endpoint,
            "gcs_credentials_file": str(key_file), "gcs_project": "test-project"}


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


def test_export_into_gcs_with_v4_signed_urls(make_server, gcs_settings, signing_key, gcs_emulator) -> None:
    server = make_server(**gcs_settings, job_ttl_seconds=6, reaper_interval_seconds=0.2)
    tenant = new_tenant()
    server.seed(3_000, tenant=tenant)
    caller = Caller(server, tenant)
    job = caller.finish(caller.create(format=pb.ExportRequest.JSON).id)
    assert job.status == pb.Job.COMPLETED, job.error
    assert job.location.startswith(f"{gcs_emulator.endpoint}/{gcs_emulator.bucket}/{tenant}/{job.id}/{tenant}.json.gz?")
    query = verify_v4_url(job.location, signing_key.public_key())
    assert query["X-Goog-Expires"] == "60"
    signed_at = dt.datetime.strptime(query["X-Goog-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)
    assert abs((job.location_expires_at.ToDatetime(dt.UTC) - signed_at).total_seconds() - 60) <= 1
    lines = gzip.decompress(fetch(job.location)).splitlines()
    assert len(lines) == 3_000 and all(json.loads(line)["user_id"] for line in lines)
    again = caller.get(job.id)
    assert again.location != job.location or query["X-Goog-Date"] == verify_v4_url(
        again.location, signing_key.public_key())["X-Goog-Date"]  # re-signed (same second may give the same URL)
    # Expiry deletes the object from the bucket: the job reads EXPIRED first, and the same reaper round
    # then deletes the file, so the 404 is waited for too (the old loop's sleep usually hid that gap).
    eventually(lambda: caller.get(job.id).status == pb.Job.EXPIRED, "the job expiring", timeout=20, every=0.2)
    unsigned = job.location.split("?")[0]
    eventually(lambda: http_status(unsigned) == 404, "the expired file deleted from the bucket", timeout=10)


USERS = 300_000


@pytest.fixture
def postgres_with_users():
    with fresh_postgres_database() as url:
        tenant = new_tenant()
        engine = make_engine(url)
        upgrade(engine)
        seed_users(engine, tenant=tenant, users=USERS)
        engine.dispose()
        yield url, tenant


def replica(data_dir, url: str, gcs: dict[str, str], **extra: str) -> ServerProcess:
    env = {"USEREXPORT_DATABASE_URL": url, "USEREXPORT_LEASE_SECONDS": "2", "USEREXPORT_LOG_LEVEL": "INFO",
           **{f"USEREXPORT_{k.upper()}": v for k, v in gcs.items()}, **extra}
    return ServerProcess(data_dir, env)


SLICE_USERS = 30_000


def slices_done(log_text: str, job_id: str) -> set[int]:
    return {int(n) for n in re.findall(rf"slice done job_id={job_id} \S+ slice=(\d+) \S+ \S+ recorded=True", log_text)}


def test_replica_killed_mid_export_resumes_on_the_survivor(postgres_with_users, gcs_settings, tmp_path) -> None:
    """Two replicas share a job's ten slices; one is SIGKILLed mid-export. The survivor takes over
    the slices the dead one was running once their leases lapse, never redoes a finished one,
    composes the file in GCS, and the progress watchers see never goes back."""
    url, tenant = postgres_with_users
    data_dir = tmp_path / "shared"  # shared secrets, as replicas share USEREXPORT_JWT_SECRET in production
    slicing = {"USEREXPORT_SLICE_USERS": str(SLICE_USERS)}
    first = replica(data_dir, url, gcs_settings, USEREXPORT_GZIP_LEVEL="9", **slicing)
    second = None
    try:
        on_first = Caller(first, tenant)  # type: ignore[arg-type]
        job = on_first.create(format=pb.ExportRequest.JSON)
        second = replica(data_dir, url, gcs_settings, USEREXPORT_GZIP_LEVEL="9", **slicing)
        on_second = Caller(second, tenant)  # type: ignore[arg-type]
        seen: list[pb.Job] = []
        stream = on_second.stub.WatchJob(pb.WatchJobRequest(id=job.id), metadata=on_second.metadata, timeout=120)
        watcher = threading.Thread(target=lambda: seen.extend(stream))
        watcher.start()
        eventually(lambda: (slices_done(first.log_text(), job.id) and "slice claimed" in second.log_text()
                            and any(m.users_written > 0 for m in seen)),
                   "both replicas taking slices and B's watcher seeing progress", timeout=60)
        first.signal(signal.SIGKILL)
        first.wait(10)
        before_kill = [m.users_written for m in seen if m.status == pb.Job.PROCESSING]
        watcher.join(120)
        final = seen[-1]
        assert final.status == pb.Job.COMPLETED, final.error
        assert final.users_written == USERS
        written = [m.users_written for m in seen if m.status == pb.Job.PROCESSING]
        assert written == sorted(written), "progress went back"
        after_kill = written[len(before_kill):]
        assert before_kill and after_kill and after_kill[0] >= before_kill[-1] - SLICE_USERS
        by_first, by_second = slices_done(first.log_text(), job.id), slices_done(second.log_text(), job.id)
        assert by_first and not by_first & by_second, "a finished slice was exported again"
        # A slice the first recorded done in the instant before SIGKILL has no log line: at most one
        # per worker is unaccounted for here; the file check below proves every user was written once.
        assert len(set(range(USERS // SLICE_USERS)) - by_first - by_second) <= 2
        assert "rescued=True" in second.log_text(), "the dead replica's running slices were taken over"
        lines = gzip.decompress(fetch(final.location)).splitlines()
        ids = [json.loads(line)["user_id"] for line in lines]
        assert len(ids) == USERS and ids == sorted(ids) and len(set(ids)) == USERS
        assert f"export done job_id={job.id}" in second.log_text()
        assert f"export done job_id={job.id}" not in first.log_text()
    finally:
        first.stop()
        if second is not None:
            second.signal(signal.SIGTERM)
            assert second.wait(60) == 0


WATCHERS = 50


def test_sigterm_drains_watchers_onto_the_other_replica(postgres_with_users, gcs_settings, tmp_path) -> None:
    """Fifty clients watch one export through the first of two replicas (the client's target names
    both). SIGTERM to the first: it hands its slices back and ends every stream UNAVAILABLE after the
    versions it had; each client watches again on the second and finishes with COMPLETED, having
    seen every version at most once, in order, and the transitions PROCESSING then COMPLETED."""
    url, tenant = postgres_with_users
    data_dir = tmp_path / "shared"
    settings = {"USEREXPORT_SLICE_USERS": str(SLICE_USERS), "USEREXPORT_GZIP_LEVEL": "9"}
    first = replica(data_dir, url, gcs_settings, USEREXPORT_SHUTDOWN_GRACE_SECONDS="0", **settings)
    second = replica(data_dir, url, gcs_settings, **settings)
    try:
        target = f"ipv4:127.0.0.1:{first.port},127.0.0.1:{second.port}"  # pick_first: the first while it serves
        job = Caller(first, tenant).create(format=pb.ExportRequest.JSON)  # type: ignore[arg-type]
        seen: list[list[pb.Job]] = [[] for _ in range(WATCHERS)]
        errors: list[BaseException] = []

        def watch(messages: list[pb.Job]) -> None:
            try:
                with UsersExportClient(target, first.token(tenant)) as client:
                    messages.extend(client.watch_job(job.id))
            except BaseException as error:
                errors.append(error)

        watchers = [threading.Thread(target=watch, args=(messages,)) for messages in seen]
        for thread in watchers:
            thread.start()
        eventually(lambda: all(any(m.users_written for m in messages) for messages in seen),
                   "every watcher seeing progress", timeout=60)
        first.signal(signal.SIGTERM)
        assert first.wait(60) == 0
        at_stop = max(m.version for messages in seen for m in messages)
        for thread in watchers:
            thread.join(120)
        assert not errors, errors[:3]
        stopping = re.search(r"server stopping \S+ watchers=(\d+)", first.log_text())
        assert stopping and int(stopping[1]) == WATCHERS
        for messages in seen:
            versions = [m.version for m in messages]
            assert versions == sorted(set(versions)), "a version was repeated or out of order"
            statuses = [s for i, s in enumerate(m.status for m in messages) if i == 0 or messages[i - 1].status != s]
            assert statuses[-2:] == [pb.Job.PROCESSING, pb.Job.COMPLETED] and len(statuses) <= 3, statuses
            assert versions[-1] > at_stop, "nothing arrived after the first replica stopped"
        final = seen[0][-1]
        ids = [json.loads(line)["user_id"] for line in gzip.decompress(fetch(final.location)).splitlines()]
        assert len(ids) == USERS and ids == sorted(ids)
        assert f"export done job_id={job.id}" in second.log_text()
    finally:
        first.stop()
        second.signal(signal.SIGTERM)
        assert second.wait(60) == 0
